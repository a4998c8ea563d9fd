"""Chat data needs a chat template: refuse a run whose tokenizer has none before anything trains.

Causal-LM records that are chat messages (SFT `messages`; preference records whose chosen, rejected or
completion are message lists) are turned into text by the tokenizer's chat template. Without one,
transformers fails only at the first rendered example, deep in evaluation or training.
"""

from __future__ import annotations

from typing import Any

from kubetune.runtime.contract import RunSpec, Task
from kubetune.runtime.io.errors import InvalidRunError

from .load import TaskData


def _chat_part(item: Any, spec: RunSpec) -> tuple[str, str] | None:
    """(spec field, column name) of the chat messages in one loaded example; None for text."""
    if not isinstance(item, dict):
        return None
    fields = spec.data.fields
    if "messages" in item:
        return "data.fields.messages", fields.messages
    if not any(isinstance(value, list) for key, value in item.items() if key != "label"):
        return None
    if "chosen" in item:
        return "data.fields.chosen", fields.chosen_field
    return "data.fields.completion", fields.completion


def chat_field(spec: RunSpec, data: TaskData) -> tuple[str, str] | None:
    """(spec field, column name) of the first chat messages in any split; None when every example is text."""
    if spec.model.task != Task.CAUSAL_LM:
        return None
    # Held-out splits first: kto's training set holds pairs split into single examples, the others the records
    # as the user wrote them.
    for split in (data.validation, data.test, data.train):
        for item in split.inputs:
            found = _chat_part(item, spec)
            if found is not None:
                return found
    return None


def check_chat_template(tokenizer: Any, spec: RunSpec, data: TaskData) -> None:
    """InvalidRunError naming model.uri and the data field when chat data meets a tokenizer without a chat template."""
    found = chat_field(spec, data)
    if found is None or getattr(tokenizer, "chat_template", None):
        return
    field, column = found
    raise InvalidRunError(
        f"model.uri, {field}",
        f"the examples' {column!r} are chat messages, which the tokenizer's chat template turns into text, but the "
        f"tokenizer of {spec.model.uri} has no chat template: use a model whose tokenizer has a chat_template "
        "(tokenizer_config.json or chat_template.jinja), or give the examples as prompt/completion text",
    )
