"""What model to fine-tune and for which task."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, model_validator

from .common import ContractModel, Uri


class Task(StrEnum):
    TEXT_CLASSIFICATION = "text-classification"
    CAUSAL_LM = "causal-lm"
    IMAGE_CLASSIFICATION = "image-classification"


CLASSIFICATION_TASKS = frozenset({Task.TEXT_CLASSIFICATION, Task.IMAGE_CLASSIFICATION})


class ModelSource(ContractModel):
    """The base model: where its Hugging Face files live and what it is fine-tuned for."""

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
        description="Revision (branch, tag or commit) of an hf:// model; ignored for other schemes.",
    )
    labels: list[str] | None = Field(
        default=None,
        min_length=2,
        max_length=10000,
        description=(
            "Class names for classification tasks, in label-id order. "
            "When omitted they are taken from the training data, sorted."
        ),
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow the model repository's own Python code to run when loading it.",
    )

    @model_validator(mode="after")
    def _labels_only_for_classification(self) -> ModelSource:
        if self.labels is not None:
            if self.task not in CLASSIFICATION_TASKS:
                raise ValueError(f"labels are only valid for classification tasks, not {self.task.value}")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must not contain duplicates")
        return self
