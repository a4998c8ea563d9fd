"""Answers of a loaded model, per task: labels and scores, completions, streamed completions. No HTTP here.

Every function takes a batch; a serving replica calls them from its batch handler, in
a worker thread, so the event loop keeps accepting requests while the model runs.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from kubetune.runtime.contract import Task
from kubetune.runtime.data.images import image_features
from kubetune.runtime.serving.loading import Loaded

# Fault injection for the serving tests only: an input equal to this makes the model call fail.
# Never set in production (the serving app sets it from KUBETUNE_FAULTS serve_input).
FAULT: dict[str, str | None] = {"input": None}


class ModelCallError(RuntimeError):
    """The model failed on a batch (not the request's fault)."""


@dataclass(frozen=True)
class Prediction:
    label: str
    scores: dict[str, float]


@dataclass(frozen=True)
class Sampling:
    """How to generate: OpenAI's parameters, already checked and capped."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Stopper:
    """Cuts generated text at the first stop string, holding back what could still become one."""

    stop: tuple[str, ...]
    text: str = ""
    sent: int = 0
    stopped: bool = field(default=False)

    def feed(self, piece: str) -> str:
        """The part of the text that is safe to send now."""
        self.text += piece
        found = [index for index in (self.text.find(s) for s in self.stop if s) if index >= 0]
        if found:
            self.stopped, self.text = True, self.text[: min(found)]
            return self._flush(len(self.text))
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._flush(max(self.sent, len(self.text) - hold))

    def finish(self) -> str:
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        out, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return out


def blank_image() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_fault(inputs: list[Any]) -> None:
    marker = FAULT["input"]
    if marker is not None and any(item == marker or item == marker.encode() for item in inputs):
        raise ModelCallError("injected fault")


@torch.inference_mode()
def classify(loaded: Loaded, inputs: list[str] | list[bytes]) -> list[Prediction]:
    """Labels and per-class probabilities: texts for text classifiers, image bytes for image classifiers."""
    _check_fault(list(inputs))
    if loaded.task == Task.IMAGE_CLASSIFICATION:
        images = [item if isinstance(item, bytes) else item.encode() for item in inputs]
        features = image_features(loaded.processor, images)  # decoded one at a time
    else:
        encoded = loaded.processor(
            list(inputs), padding=True, truncation=True, max_length=loaded.max_length, return_tensors="pt"
        )
        features = {name: value for name, value in encoded.items() if isinstance(value, torch.Tensor)}
    probabilities = torch.softmax(loaded.model(**features).logits.float(), dim=-1)
    names = loaded.labels or [str(i) for i in range(probabilities.shape[-1])]
    return [
        Prediction(names[int(row.argmax())], {name: round(float(p), 6) for name, p in zip(names, row, strict=True)})
        for row in probabilities
    ]


def _generate_options(loaded: Loaded, sampling: Sampling) -> dict[str, Any]:
    tokenizer = loaded.processor
    options: dict[str, Any] = {
        "max_new_tokens": sampling.max_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if sampling.greedy:
        options["do_sample"] = False
    else:
        options |= {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
    return options


def _encode_prompts(loaded: Loaded, prompts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer = loaded.processor
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    rows = [row[-loaded.max_length :] for row in rows]  # over-long prompts keep their end
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):  # padded on the left: every prompt ends where generation starts
        input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention[index, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


@torch.inference_mode()
def complete(loaded: Loaded, prompts: list[str], sampling: Sampling) -> list[Completion]:
    """One completion per prompt, generated together (prompts of one batch share their sampling)."""
    _check_fault(prompts)
    encoded = _encode_prompts(loaded, prompts)
    generated = loaded.model.generate(**encoded, **_generate_options(loaded, sampling))  # type: ignore[operator]
    width = encoded["input_ids"].shape[1]
    tokenizer = loaded.processor
    results = []
    for index, row in enumerate(generated[:, width:].tolist()):
        tokens = _until_end(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
        ended = len(tokens) < len(row) or (len(row) < sampling.max_tokens)
        stopper = _Stopper(sampling.stop)
        text = stopper.feed(tokenizer.decode(tokens, skip_special_tokens=True)) + stopper.finish()
        finish = "stop" if ended or stopper.stopped else "length"
        prompt_tokens = int(encoded["attention_mask"][index].sum())
        results.append(Completion(text, finish, prompt_tokens, len(tokens)))
    return results


def _until_end(tokens: list[int], eos: int | None, pad: int | None) -> list[int]:
    for position, token in enumerate(tokens):
        if token == eos or (token == pad and pad != eos and pad is not None):
            return tokens[:position]
    return tokens


def stream(loaded: Loaded, prompt: str, sampling: Sampling) -> Iterator[tuple[str, str | None]]:
    """(text piece, finish reason) as tokens are generated; the reason comes with the last piece.

    Generation runs in a thread of its own and stops as soon as the reader stops reading
    (a stop string, or a client gone).
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    _check_fault([prompt])
    streamer = TextIteratorStreamer(loaded.processor, skip_prompt=True, skip_special_tokens=True)
    encoded = _encode_prompts(loaded, [prompt])
    cancelled = threading.Event()
    counted: list[int] = []
    failure: list[BaseException] = []

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

    def generate() -> None:
        try:
            with torch.inference_mode():
                out = loaded.model.generate(  # type: ignore[operator]
                    **encoded,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                    **_generate_options(loaded, sampling),
                )
            counted.append(out.shape[1] - encoded["input_ids"].shape[1])
        except BaseException as error:  # handed to the reading side below
            failure.append(error)
            streamer.end()  # type: ignore[no-untyped-call]

    worker = threading.Thread(target=generate, name="kubetune-generate", daemon=True)
    worker.start()
    stopper = _Stopper(sampling.stop)
    try:
        for piece in streamer:
            safe = stopper.feed(piece)
            if stopper.stopped:
                yield safe, "stop"
                return
            if safe:
                yield safe, None
    finally:
        cancelled.set()
        worker.join()
    if failure:
        raise ModelCallError(str(failure[0])) from failure[0]
    generated = counted[0] if counted else 0
    yield stopper.finish(), "length" if generated >= sampling.max_tokens else "stop"


def chat_prompt(loaded: Loaded, messages: list[dict[str, str]]) -> str:
    """The prompt of a chat, through the tokenizer's chat template."""
    prompt: str = loaded.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt
