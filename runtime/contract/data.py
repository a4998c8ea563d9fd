"""Where the training data lives, its format, field names and splits."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field, model_validator

from .common import ContractModel, DataUri, cel_rule, with_cel

FIELD_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]*$"
# A split as the datasets library names it: a name, optionally sliced ("train[:90%]"), or several joined by "+".
SPLIT_PATTERN = r"^[A-Za-z0-9_.-]+(\[[-0-9%:]*\])?(\+[A-Za-z0-9_.-]+(\[[-0-9%:]*\])?)*$"
# The dataset's own configuration (subset) name, as the Hub lists it.
CONFIG_NAME_PATTERN = r"^[A-Za-z0-9_][-A-Za-z0-9_.]*$"


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


HUB_WITHOUT_HUB_DATA = (
    "hub applies to data on the Hugging Face Hub: it needs train, validation or test on hf://datasets/"
)
# The data fields a split of a Hub dataset can feed, each with the split taken when none is named.
HUB_SPLITS = {"train": "trainSplit", "validation": "validationSplit", "test": "testSplit"}
DEFAULT_HUB_SPLITS = {"train": "train", "validation": "validation", "test": "test"}


def hub_split_rule(data_field: str, split_field: str) -> dict[str, Any]:
    """CEL: a split of the Hub's dataset is named only for a data field that reads from the Hub."""
    reads_hub = f"self.{data_field}.startsWith('hf://')"
    if data_field != "train":  # validation and test are optional
        reads_hub = f"(has(self.{data_field}) && {reads_hub})"
    return cel_rule(
        f"!has(self.hub) || !has(self.hub.{split_field}) || {reads_hub}",
        f"hub.{split_field} names a split of an hf://datasets/ repository: it needs {data_field} on the Hub",
        f".hub.{split_field}",
    )


class HubDataset(ContractModel):
    """Which version, configuration and splits of the hf://datasets/ repositories the run reads."""

    revision: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description=(
            "Revision (commit, tag or branch) of the hf://datasets/ repositories; their main branch when omitted. "
            "A full commit hash keeps the data the same for every run."
        ),
    )
    config: str | None = Field(
        default=None,
        pattern=CONFIG_NAME_PATTERN,
        max_length=128,
        description="Configuration (subset) of the dataset, as the Hub lists it; the dataset's default when omitted.",
    )
    train_split: str | None = Field(
        default=None,
        pattern=SPLIT_PATTERN,
        max_length=256,
        description=(
            "Split of the dataset that data.train reads, as the datasets library names it, slices included "
            "(train[:90%]); train when omitted."
        ),
    )
    validation_split: str | None = Field(
        default=None,
        pattern=SPLIT_PATTERN,
        max_length=256,
        description="Split that data.validation reads (for example train[90%:]); validation when omitted.",
    )
    test_split: str | None = Field(
        default=None,
        pattern=SPLIT_PATTERN,
        max_length=256,
        description="Split that data.test reads; test when omitted.",
    )

    def split_for(self, data_field: str) -> str:
        """The split read for `data_field` (train, validation or test)."""
        named: str | None = getattr(self, f"{data_field}_split")
        return named or DEFAULT_HUB_SPLITS[data_field]


class DataSpec(ContractModel):
    """The training data, and optionally separate validation and test sets."""

    model_config = with_cel(
        cel_rule(
            "!has(self.hub) || self.train.startsWith('hf://') || (has(self.validation) && "
            "self.validation.startsWith('hf://')) || (has(self.test) && self.test.startsWith('hf://'))",
            HUB_WITHOUT_HUB_DATA,
            ".hub",
        ),
        *(hub_split_rule(data_field, split) for data_field, split in HUB_SPLITS.items()),
    )

    train: DataUri = Field(
        description=(
            "Training data: a file, a folder of files, an image folder, or a dataset on the Hugging Face Hub "
            "(hf://datasets/<org>/<name>, its train split unless hub.trainSplit names another)."
        )
    )
    validation: DataUri | None = Field(
        default=None, description="Validation data; split off the training data when omitted."
    )
    test: DataUri | None = Field(
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
    hub: HubDataset | None = Field(
        default=None,
        description=(
            "Revision, configuration and splits of the data on the Hugging Face Hub (hf://datasets/ URIs). "
            "Their records are read like a file's, with the field names of data.fields; data.format does not apply."
        ),
    )

    @model_validator(mode="after")
    def _hub_splits_have_hub_data(self) -> DataSpec:
        if self.hub is None:
            return self
        if not any((uri or "").startswith("hf://") for uri in (self.train, self.validation, self.test)):
            raise ValueError(HUB_WITHOUT_HUB_DATA)
        for data_field, split_field in HUB_SPLITS.items():
            uri: str | None = getattr(self, data_field)
            if getattr(self.hub, f"{data_field}_split") is not None and not (uri or "").startswith("hf://"):
                raise ValueError(
                    f"hub.{split_field} names a split of an hf://datasets/ repository: it needs {data_field} on the "
                    f"Hub (got {uri!r})"
                )
        return self
