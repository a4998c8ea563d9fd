"""What model to fine-tune and for which task."""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import Field, model_validator

from .common import ContractModel, Uri, cel_rule, with_cel


class Task(StrEnum):
    TEXT_CLASSIFICATION = "text-classification"
    CAUSAL_LM = "causal-lm"
    IMAGE_CLASSIFICATION = "image-classification"


CLASSIFICATION_TASKS = frozenset({Task.TEXT_CLASSIFICATION, Task.IMAGE_CLASSIFICATION})
# A full git commit id: a branch or tag would run whatever code is pushed to it later.
COMMIT_HASH_PATTERN = r"^[0-9a-f]{40}$"
_COMMIT_HASH_RE = re.compile(COMMIT_HASH_PATTERN)
PINNED_REVISION_MESSAGE = (
    "model.trustRemoteCode needs model.revision to be a full 40-character commit hash (lowercase hex), "
    "not a branch or tag, so the model's code cannot change under the run"
)


class ModelSource(ContractModel):
    """The base model: where its Hugging Face files live and what it is fine-tuned for."""

    model_config = with_cel(
        cel_rule(
            "!(has(self.trustRemoteCode) && self.trustRemoteCode && self.uri.startsWith('hf://'))"
            f" || (has(self.revision) && self.revision.matches('{COMMIT_HASH_PATTERN}'))",
            PINNED_REVISION_MESSAGE,
            ".revision",
        ),
        cel_rule(
            "!has(self.labels) || self.task in ["
            + ", ".join(f"'{task.value}'" for task in sorted(CLASSIFICATION_TASKS))
            + "]",
            "labels are only valid for classification tasks",
            ".labels",
        ),
    )

    uri: Uri = Field(
        description=(
            "Location of the base model in Hugging Face format: hf://<org>/<name>, "
            "s3://<bucket>/<prefix>, pvc://<claim>/<path>, file://<path> or a plain path."
        )
    )
    task: Task = Field(
        default=Task.TEXT_CLASSIFICATION,
        description="What the model is fine-tuned for: text-classification, causal-lm or image-classification.",
    )
    revision: str | None = Field(
        default=None,
        max_length=255,
        description=(
            "Revision (branch, tag or commit) of an hf:// model; ignored for other schemes. "
            "With trustRemoteCode it must be a full 40-character commit hash."
        ),
    )
    labels: list[str] | None = Field(
        default=None,
        min_length=2,
        max_length=10000,
        description=(
            "Class names for classification tasks, in label-id order, each once. "
            "When omitted they are taken from the training data, sorted."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},  # the API server refuses duplicates
    )
    trust_remote_code: bool = Field(
        default=False,
        description=(
            "Allow the model repository's own Python code to run when loading it. "
            "For an hf:// model this needs revision pinned to a full commit hash. On a cluster the operator "
            "runs it only for models its settings allow (allowedRemoteCodeModels), whatever the scheme."
        ),
    )

    @model_validator(mode="after")
    def _remote_code_is_pinned(self) -> ModelSource:
        # Only hf:// resolves `revision`; other schemes load whatever files the location holds.
        pinned = self.revision is not None and _COMMIT_HASH_RE.fullmatch(self.revision) is not None
        if self.trust_remote_code and self.uri.startswith("hf://") and not pinned:
            raise ValueError(f"{PINNED_REVISION_MESSAGE} (got {self.revision!r})")
        return self

    @model_validator(mode="after")
    def _labels_only_for_classification(self) -> ModelSource:
        if self.labels is not None:
            if self.task not in CLASSIFICATION_TASKS:
                raise ValueError(f"labels are only valid for classification tasks, not {self.task.value}")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must not contain duplicates")
        return self
