"""Data named by its Hub id: hf://datasets/<org>/<name> URIs and data.hub, in pydantic and in the CRD's schema."""

from __future__ import annotations

import re
from typing import Any

import pytest
from kubetune.cli.validate import schema_for
from kubetune.runtime.contract import DATA_URI_PATTERN, URI_PATTERN, DataSpec, HubDataset, ModelSource
from kubetune.runtime.contract.data import SPLIT_PATTERN
from kubetune.runtime.io.storage import hub_dataset_id, parse_uri
from pydantic import ValidationError

from ..conftest import load_example

DATASET = "hf://datasets/acme/topics"


def _refusal(model: type[Any], document: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as refused:
        model.model_validate(document)
    return "; ".join(error["msg"] for error in refused.value.errors())


@pytest.mark.parametrize(
    ("uri", "repo_id"),
    [
        (DATASET, "acme/topics"),
        ("hf://datasets/squad", "squad"),
        ("hf://acme/model", None),
        ("s3://bucket/datasets/acme/topics", None),
        ("datasets/acme/topics.jsonl", None),
        ("hf://datasets/", None),
    ],
)
def test_the_repository_of_a_hub_dataset(uri: str, repo_id: str | None) -> None:
    assert hub_dataset_id(uri) == repo_id
    assert parse_uri(uri).uri == uri


@pytest.mark.parametrize(
    "uri", [DATASET, "hf://datasets/squad", "hf://datasets/Org-1/name_2.v3", "s3://acme-data/t.jsonl", "t.jsonl"]
)
def test_data_may_live_on_the_hub(uri: str) -> None:
    assert DataSpec.model_validate({"train": uri, "validation": uri, "test": uri}).train == uri
    assert re.fullmatch(DATA_URI_PATTERN, uri)  # what the CRD checks at admission


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("hf://acme/topics", "names a model on the Hugging Face Hub; a dataset there is hf://datasets/<org>/<name>"),
        ("hf://datasets/acme/topics/extra", "malformed URI"),
        ("hf://datasets/acme/to pics", "malformed URI"),
        ("gs://acme/topics", "unsupported URI scheme 'gs'"),
    ],
)
def test_data_uris_that_name_no_dataset_are_refused(uri: str, problem: str) -> None:
    assert problem in _refusal(DataSpec, {"train": uri})
    assert not re.fullmatch(DATA_URI_PATTERN, uri)


def test_a_model_uri_naming_a_dataset_is_refused() -> None:
    assert "names a dataset on the Hugging Face Hub" in _refusal(ModelSource, {"uri": DATASET})
    assert not re.fullmatch(URI_PATTERN, DATASET)


def test_the_crd_checks_data_uris_with_the_data_pattern() -> None:
    spec = schema_for("FineTuneJob")["properties"]["spec"]["properties"]
    data = spec["data"]
    for field in ("train", "validation", "test"):
        assert data["properties"][field]["pattern"] == DATA_URI_PATTERN
    assert spec["model"]["properties"]["uri"]["pattern"] == URI_PATTERN
    hub = data["properties"]["hub"]["properties"]
    assert set(hub) == {"revision", "config", "trainSplit", "validationSplit", "testSplit"}
    assert all(hub[name]["description"] for name in hub)


@pytest.mark.parametrize("split", ["train", "train[:90%]", "train[90%:]", "test+validation", "train[10:20]+test[:5%]"])
def test_splits_as_the_datasets_library_names_them(split: str) -> None:
    assert re.fullmatch(SPLIT_PATTERN, split)
    data = DataSpec.model_validate({"train": DATASET, "hub": {"trainSplit": split}})
    assert data.hub is not None and data.hub.split_for("train") == split


@pytest.mark.parametrize("split", ["", "train test", "train[:90%", "train;rm", "../train"])
def test_splits_that_are_no_split_are_refused(split: str) -> None:
    _refusal(DataSpec, {"train": DATASET, "hub": {"trainSplit": split}})


def test_each_data_field_reads_its_own_split_by_default() -> None:
    hub = HubDataset()
    assert [hub.split_for(field) for field in ("train", "validation", "test")] == ["train", "validation", "test"]
    assert HubDataset(test_split="train[90%:]").split_for("test") == "train[90%:]"


def test_hub_options_are_unset_by_default_so_existing_specs_keep_their_wire_form() -> None:
    job = load_example("finetunejob-minimal.yaml")
    data = DataSpec.model_validate(job["spec"]["data"])
    assert data.hub is None and "hub" not in data.to_wire()
