"""Preference data: prompt/chosen/rejected pairs (dpo, orpo, simpo, kto) and prompt/completion/label records (kto).

Records are read and checked here, naming the example and the field of anything wrong; TRL's data helpers
then do what TRL's trainers do with them: take a shared conversation prefix as the prompt, apply the
tokenizer's chat template. KTO trains on pairs split into a desirable and an undesirable example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from kubetune.runtime.contract import DataSpec, Objective
from kubetune.runtime.io.errors import DataError

from .causal import IGNORE_INDEX, fitted, pad_causal
from .readers import Record

# Spellings of a KTO label that CSV and JSON files use.
_DESIRABLE = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _text_or_messages(value: Any, number: int, uri: str, field: str, name: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        messages = []
        for message in value:
            if not isinstance(message, dict) or not {"role", "content"} <= set(message):
                raise DataError(
                    field, f"example {number} of {uri}: every message of {name!r} needs a role and a content"
                )
            messages.append({"role": str(message["role"]), "content": str(message["content"])})
        return messages
    raise DataError(field, f"example {number} of {uri}: {name!r} must be text or a non-empty list of messages")


def _required(record: Record, name: str, number: int, uri: str, field: str) -> Any:
    if record.get(name) is None:
        present = ", ".join(sorted(record)) or "none"
        raise DataError(field, f"field {name!r} is missing in example {number} of {uri} (fields present: {present})")
    return record[name]


def _part(record: Record, name: str, field: str, number: int, uri: str) -> str | list[dict[str, str]]:
    """The text or messages of field `name` of a record (`field`: the spec field that names it)."""
    return _text_or_messages(_required(record, name, number, uri, field), number, uri, field, name)


def _label(value: Any, number: int, uri: str) -> bool:
    if isinstance(value, bool):
        return value
    desirable = _DESIRABLE.get(str(value).strip().lower())
    if desirable is None:
        raise DataError("data.fields.label", f"example {number} of {uri}: label must be true or false, not {value!r}")
    return desirable


def preference_record(record: Record, number: int, uri: str, data: DataSpec, objective: Objective) -> dict[str, Any]:
    """One checked record in TRL's form: {prompt, chosen, rejected} or (kto only) {prompt, completion, label}."""
    from trl.data_utils import maybe_extract_prompt

    fields = data.fields
    chosen_name, rejected_name = fields.chosen_field, fields.rejected_field
    if objective == Objective.KTO and chosen_name not in record and fields.completion in record:
        prompt = _text_or_messages(
            _required(record, fields.prompt, number, uri, "data.fields.prompt"),
            number,
            uri,
            "data.fields.prompt",
            "prompt",
        )
        completion = _text_or_messages(
            _required(record, fields.completion, number, uri, "data.fields.completion"),
            number,
            uri,
            "data.fields.completion",
            "completion",
        )
        label = _label(_required(record, fields.label, number, uri, "data.fields.label"), number, uri)
        return _same_form({"prompt": prompt, "completion": completion, "label": label}, number, uri)
    chosen = _text_or_messages(
        _required(record, chosen_name, number, uri, "data.fields.chosen"),
        number,
        uri,
        "data.fields.chosen",
        chosen_name,
    )
    rejected = _text_or_messages(
        _required(record, rejected_name, number, uri, "data.fields.rejected"),
        number,
        uri,
        "data.fields.rejected",
        rejected_name,
    )
    pair: dict[str, Any] = {"chosen": chosen, "rejected": rejected}
    if record.get(fields.prompt) is not None:
        pair["prompt"] = _text_or_messages(record[fields.prompt], number, uri, "data.fields.prompt", fields.prompt)
    elif isinstance(chosen, str):
        raise DataError(
            "data.fields.prompt",
            f"field {fields.prompt!r} is missing in example {number} of {uri}: text pairs need a prompt "
            "(conversations may leave it out: their shared first messages are the prompt)",
        )
    else:
        pair = maybe_extract_prompt(pair)  # the conversations' shared prefix is the prompt
        if not pair["prompt"]:
            raise DataError("data.fields.prompt", f"example {number} of {uri}: chosen and rejected share no prompt")
    return _same_form(pair, number, uri)


def _same_form(record: dict[str, Any], number: int, uri: str) -> dict[str, Any]:
    """A record is all text or all conversation: a chat template cannot join the two."""
    kinds = {isinstance(value, list) for key, value in record.items() if key != "label"}
    if len(kinds) > 1:
        raise DataError(
            "data.fields.prompt", f"example {number} of {uri}: mixes text and chat messages; use one or the other"
        )
    return record


def unpaired(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs split into a desirable and an undesirable example each, as TRL unpairs them for KTO's training."""
    examples = []
    for record in records:
        if not is_paired(record):
            examples.append(record)
            continue
        examples.append({"prompt": record["prompt"], "completion": record["chosen"], "label": True})
        examples.append({"prompt": record["prompt"], "completion": record["rejected"], "label": False})
    return examples


def is_paired(record: dict[str, Any]) -> bool:
    return "chosen" in record


@dataclass(frozen=True)
class Row:
    """One prompt and completion as token ids, and whether the completion is the desirable one."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool


def _as_text(tokenizer: Any, record: dict[str, Any]) -> dict[str, Any]:
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    text: dict[str, Any] = maybe_apply_chat_template(maybe_extract_prompt(record), tokenizer)
    return text


def _tokens(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def preference_rows(tokenizer: Any, record: dict[str, Any]) -> list[Row]:
    """The record's rows: a pair gives its chosen then its rejected completion, a kto record its one completion."""
    text = _as_text(tokenizer, record)
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    suffix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt = prefix + _tokens(tokenizer, text["prompt"])
    if is_paired(record):
        return [
            Row(prompt, _tokens(tokenizer, text["chosen"]) + suffix, True),
            Row(prompt, _tokens(tokenizer, text["rejected"]) + suffix, False),
        ]
    return [Row(prompt, _tokens(tokenizer, text["completion"]) + suffix, bool(record["label"]))]


def encode_preferences(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
    """A batch of preference records as model rows: the pairs' chosen completions, then their rejected ones in the
    same order, then single (kto) examples. `desirable` marks each row's side, `pair` its pair (-1: none)."""
    paired = [preference_rows(tokenizer, record) for record in records if is_paired(record)]
    singles = [preference_rows(tokenizer, record)[0] for record in records if not is_paired(record)]
    rows = [chosen for chosen, _ in paired] + [rejected for _, rejected in paired] + singles
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = pad_causal([fitted(row.prompt_ids, row.completion_ids, max_length) for row in rows], pad)
    batch["desirable"] = torch.tensor([row.desirable for row in rows], dtype=torch.bool)
    pair_ids = list(range(len(paired)))
    batch["pair"] = torch.tensor(pair_ids + pair_ids + [-1] * len(singles), dtype=torch.long)
    return batch


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its completion tokens, and how many there are."""
    shifted_logits = logits[:, :-1, :].float()  # position t predicts token t+1
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(shifted_logits, dim=-1)
    token_logps = torch.gather(log_probs, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1)


def paired_count(batch: dict[str, torch.Tensor]) -> int:
    """How many pairs the batch's first rows hold (their chosen, then their rejected completions)."""
    return int((batch["pair"] >= 0).sum()) // 2


def mismatched_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each row's prompt with the previous row's completion (the first takes the last's): the unmatched pairs
    from which KTO estimates how far the model has drifted from the reference, as TRL's KTO collator builds them."""
    rows = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        length = int(mask.sum())
        completion = (labels[:length] != IGNORE_INDEX).nonzero()
        start = int(completion[0]) if len(completion) else length
        rows.append((ids[:start].tolist(), ids[start:length].tolist()))
    shifted = [Row(prompt, rows[index - 1][1], True) for index, (prompt, _) in enumerate(rows)]
    # Twice the width keeps every row whole; padding is masked out, so its token id does not matter.
    width = 2 * batch["input_ids"].shape[1]
    return pad_causal([fitted(row.prompt_ids, row.completion_ids, width) for row in shifted], 0)
