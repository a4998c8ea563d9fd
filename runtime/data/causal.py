"""Token rows of causal-LM examples: a prompt and a completion, cut to fit, padded into a batch."""

from __future__ import annotations

import torch

# Label value the causal-LM loss skips (prompt and padding tokens); the same as in transformers.
IGNORE_INDEX = -100


def fitted(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, labels) within `max_length`: a long prompt loses its start, the completion its end; the
    labels are IGNORE_INDEX over the prompt, so only the completion is learned."""
    keep_prompt = max(1, max_length - len(completion_ids))
    prompt_ids = prompt_ids[-keep_prompt:]
    ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return ids, labels


def pad_causal(pairs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Encoded examples one a row, padded at the end to the longest, with an attention mask."""
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, targets) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(targets)] = torch.tensor(targets)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
