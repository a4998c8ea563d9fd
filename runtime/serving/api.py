"""The HTTP API of a serving replica: request and answer bodies, limits.

Classification: `POST /v1/predict` with `{"inputs": "text" | ["text", ...]}` (images as
base64 strings). Causal LMs: OpenAI-compatible `POST /v1/completions` and
`POST /v1/chat/completions`. Errors (errors.py) have OpenAI's shape, never a stack trace;
the token and the body's size are checked before a body is read (guard.py).
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from kubetune.runtime.contract.serving import ServeAppArgs
from kubetune.runtime.data.images import ImageProblem, ImageRejectedError, check_served_image
from kubetune.runtime.serving.errors import RequestError
from kubetune.runtime.serving.predict import Completion, Prediction, Sampling
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

# OpenAI's limits on stop sequences: how many, and (kubetune's) how long each may be.
MAX_STOPS = 4
MAX_STOP_CHARS = 256


class _Request(BaseModel):
    # Clients send fields this server does not use (user, logprobs, seed, ...): ignored, as OpenAI's server does.
    model_config = ConfigDict(extra="ignore", strict=False)


def _one_or_many(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ValueError("expected a string or a list of strings")


# A string or a list of strings, as a list.
Texts = Annotated[list[str], BeforeValidator(_one_or_many)]


class PredictRequest(_Request):
    inputs: Texts = Field(description="A text, or a list of texts (images: base64 strings).")


class _Generation(_Request):
    """What completions and chats share: OpenAI's sampling parameters (one choice per request)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        stops = [value] if isinstance(value, str) else value or []
        for index, stop in enumerate(stops):
            if len(stop) > MAX_STOP_CHARS:
                where = "stop" if isinstance(value, str) else f"stop[{index}]"
                raise ValueError(f"{where} has {len(stop)} characters; at most {MAX_STOP_CHARS}")
        return value


class CompletionRequest(_Generation):
    prompt: Texts


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


@dataclass(frozen=True)
class Limits:
    max_inputs: int
    max_chars: int
    max_new_tokens: int

    @classmethod
    def of(cls, args: ServeAppArgs) -> Limits:
        return cls(args.max_inputs_per_request, args.max_input_chars, args.max_new_tokens)

    def inputs(self, items: list[str], param: str) -> list[str]:
        """The request's inputs, within the limits on their number and length."""
        if not items:
            raise RequestError(422, f"{param} is empty", param)
        if len(items) > self.max_inputs:
            raise RequestError(413, f"{param} has {len(items)} items; at most {self.max_inputs} per request", param)
        for index, item in enumerate(items):
            if len(item) > self.max_chars:
                where = f"{param}[{index}]"
                raise RequestError(413, f"{where} has {len(item)} characters; at most {self.max_chars}", where)
        return items

    def sampling(self, request: _Generation, max_tokens: int | None = None) -> Sampling:
        """The request's sampling, its token budget capped by maxNewTokens."""
        stop = request.stop
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        wanted = max_tokens or request.max_tokens or self.max_new_tokens
        return Sampling(min(wanted, self.max_new_tokens), request.temperature, request.top_p, stops)


# How an image the endpoint does not take is answered.
IMAGE_PROBLEM_STATUS = {
    ImageProblem.UNREADABLE: 400,
    ImageProblem.UNSUPPORTED_FORMAT: 415,
    ImageProblem.TOO_LARGE: 413,
}


def decode_images(items: list[str]) -> list[bytes]:
    """The request's images, each checked from its header (format, size) before any is decoded."""
    images = []
    for index, item in enumerate(items):
        try:
            images.append(base64.b64decode(item.split(",", 1)[-1], validate=True))  # data: URLs too
        except (binascii.Error, ValueError):
            raise RequestError(400, f"inputs[{index}] is not base64", f"inputs[{index}]") from None
        try:
            check_served_image(images[-1])
        except ImageRejectedError as error:
            status = IMAGE_PROBLEM_STATUS[error.problem]
            raise RequestError(status, f"inputs[{index}] is {error}", f"inputs[{index}]") from None
    return images


def predictions_body(model: str, predictions: list[Prediction]) -> dict[str, Any]:
    return {
        "model": model,
        "predictions": [{"label": p.label, "scores": p.scores} for p in predictions],
    }


def _usage(completions: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(model: str, completions: list[Completion]) -> dict[str, Any]:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            for index, c in enumerate(completions)
        ],
        "usage": _usage(completions),
    }


def chat_body(model: str, completion: Completion) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage([completion]),
    }


def completion_chunk(identity: str, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": identity,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }


def chat_chunk(identity: str, model: str, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {
        "id": identity,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "kubetune"}]}
