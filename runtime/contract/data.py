"""Where the training data lives, its format, field names and splits."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, model_validator

from .common import ContractModel, Uri, cel_rule, with_cel

FIELD_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]*$"


class DataFormat(StrEnum):
    AUTO = "auto"
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"
    IMAGE_FOLDER = "imagefolder"


class DataFields(ContractModel):
    """Names of the columns (or JSON keys) that hold each part of an example."""

    text: str = Field(
        default="text", pattern=FIELD_NAME_PATTERN, max_length=128, description="Input text for text classification."
    )
    label: str = Field(
        default="label",
        pattern=FIELD_NAME_PATTERN,
        max_length=128,
        description=(
            "Class label for classification (a name or an integer id); for objective kto, whether the completion "
            "is desirable (true or false)."
        ),
    )
    prompt: str = Field(
        default="prompt",
        pattern=FIELD_NAME_PATTERN,
        max_length=128,
        description="Prompt for causal-LM supervised fine-tuning.",
    )
    completion: str = Field(
        default="completion",
        pattern=FIELD_NAME_PATTERN,
        max_length=128,
        description="Completion for causal-LM SFT; the loss is computed on it only.",
    )
    messages: str = Field(
        default="messages",
        pattern=FIELD_NAME_PATTERN,
        max_length=128,
        description=(
            "Chat messages ([{role, content}, ...]) for causal-LM SFT with the "
            "tokenizer's chat template; used when the prompt field is absent."
        ),
    )
    # Unset by default (the names below apply): a spec written before them keeps its run hash.
    chosen: str | None = Field(
        default=None,
        pattern=FIELD_NAME_PATTERN,
        max_length=128,
        description="Preferred completion of a preference pair (text or chat messages). chosen when omitted.",
    )
    rejected: str | None = Field(
        default=None,
        pattern=FIELD_NAME_PATTERN,
        max_length=128,
        description="Dispreferred completion of a preference pair (text or chat messages). rejected when omitted.",
    )
    image: str = Field(
        default="image",
        pattern=FIELD_NAME_PATTERN,
        max_length=128,
        description="Image path or bytes for image classification (tabular formats).",
    )

    @property
    def chosen_field(self) -> str:
        return self.chosen or "chosen"

    @property
    def rejected_field(self) -> str:
        return self.rejected or "rejected"


class DataSplit(ContractModel):
    """How to carve validation and test sets out of the training data when no URIs are given."""

    model_config = with_cel(
        cel_rule(
            # Both fields have schema defaults, so they are present when rules run.
            "self.validationFraction + self.testFraction < 1.0",
            "validationFraction + testFraction must be below 1",
        )
    )

    validation_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Fraction of the training data held out for validation."
    )
    test_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Fraction of the training data held out for the before/after test."
    )
    seed: int = Field(default=42, ge=0, description="Seed of the random split, so runs are reproducible.")

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataSplit:
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "validationFraction + testFraction must be below 1 "
                f"(got {self.validation_fraction} + {self.test_fraction})"
            )
        return self


class DataSpec(ContractModel):
    """The training data, and optionally separate validation and test sets."""

    train: Uri = Field(description="Training data: a file, a folder of files or an image folder.")
    validation: Uri | None = Field(
        default=None, description="Validation data; split off the training data when omitted."
    )
    test: Uri | None = Field(
        default=None, description="Test data for the before/after evaluation; split off the training data when omitted."
    )
    format: DataFormat = Field(
        default=DataFormat.AUTO, description="File format; auto picks it from the file extension."
    )
    fields: DataFields = Field(default_factory=DataFields, description="Column names of the examples.")
    split: DataSplit = Field(
        default_factory=DataSplit, description="Seeded split used for the sets that have no URI of their own."
    )
    max_samples: int | None = Field(
        default=None, ge=1, description="Use at most this many training examples (for quick trials)."
    )
    # Unset (not false) by default: a spec written before packing existed keeps its run hash, so it is not re-run.
    packing: bool | None = Field(
        default=None,
        description=(
            "Pack causal-LM training examples padding-free into rows of up to hyperparameters.maxSequenceLength "
            "tokens (batchSize rows a step), keeping each example's attention to itself: position ids restart per "
            "example, so no compute is spent on padding. Validation and test stay unpacked. causal-lm only; "
            "off when omitted."
        ),
    )
