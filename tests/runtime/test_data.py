"""Loading, splitting and validating text-classification data from every supported location and format."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubetune.runtime.data.load import infer_labels, load_data
from kubetune.runtime.data.readers import read_records
from kubetune.runtime.io.errors import DataError
from kubetune.runtime.io.settings import RuntimeSettings

from .conftest import make_spec
from .s3server import s3_endpoint
from .topics import LABELS, make_examples, write_csv, write_jsonl, write_parquet

pytestmark = pytest.mark.runtime
__all__ = ["s3_endpoint"]  # a fixture, used by name

RECORDS = make_examples(80, seed=3)


@pytest.fixture
def settings(tmp_path: Path) -> RuntimeSettings:
    return RuntimeSettings(pvc_root=tmp_path / "pvc", cache_dir=tmp_path / "cache")


def _load(model_dir: Path, train: Path | str, settings: RuntimeSettings, **overrides: object):  # type: ignore[no-untyped-def]
    return load_data(make_spec(model_dir, train, settings.cache_dir / "out", **overrides), settings)


@pytest.mark.parametrize("writer", [write_jsonl, write_csv, write_parquet])
def test_every_format_reads_the_same_examples(writer, tmp_path: Path, settings: RuntimeSettings) -> None:  # type: ignore[no-untyped-def]
    suffix = {write_jsonl: "jsonl", write_csv: "csv", write_parquet: "parquet"}[writer]
    path = writer(tmp_path / f"train.{suffix}", RECORDS)
    records = read_records(f"file://{path}", make_spec(Path("m"), path, tmp_path).data.format, settings, "data.train")
    assert records == RECORDS


def test_seeded_stratified_split(model_dir: Path, tmp_path: Path, settings: RuntimeSettings) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    data = _load(model_dir, path, settings, data={"split": {"validationFraction": 0.25, "testFraction": 0.25}})
    again = _load(model_dir, path, settings, data={"split": {"validationFraction": 0.25, "testFraction": 0.25}})
    assert data == again
    assert (len(data.train), len(data.validation), len(data.test)) == (40, 20, 20)
    # Every label keeps its share in each split, and no example is in two splits.
    assert sorted(data.test.label_ids) == sorted([0, 1, 2, 3] * 5)
    everything = data.train.texts + data.validation.texts + data.test.texts
    assert sorted(everything) == sorted(r["text"] for r in RECORDS)
    assert data.labels == LABELS
    assert data.sources["test"] == f"{path}#test"
    other = _load(model_dir, path, settings, data={"split": {"seed": 1, "validationFraction": 0.25}})
    assert other.test.texts != data.test.texts


def test_split_uris_pvc_paths_and_max_samples(model_dir: Path, tmp_path: Path, settings: RuntimeSettings) -> None:
    write_csv(settings.pvc_root / "datasets" / "topics" / "train.csv", RECORDS[:60])
    validation = write_parquet(tmp_path / "validation.parquet", RECORDS[60:70])
    test = write_jsonl(tmp_path / "test.jsonl", RECORDS[70:])
    data = _load(
        model_dir,
        "pvc://datasets/topics/train.csv",
        settings,
        data={"validation": str(validation), "test": f"file://{test}", "maxSamples": 50},
    )
    assert (len(data.train), len(data.validation), len(data.test)) == (50, 10, 10)
    assert data.validation.texts == [r["text"] for r in RECORDS[60:70]]
    assert data.test.label_ids == [LABELS.index(r["label"]) for r in RECORDS[70:]]


def test_a_folder_of_files_and_custom_field_names(model_dir: Path, tmp_path: Path, settings: RuntimeSettings) -> None:
    renamed = [{"sentence": r["text"], "topic": r["label"]} for r in RECORDS]
    write_jsonl(tmp_path / "folder" / "part-0.jsonl", renamed[:40])
    write_jsonl(tmp_path / "folder" / "part-1.jsonl", renamed[40:])
    data = _load(model_dir, tmp_path / "folder", settings, data={"fields": {"text": "sentence", "label": "topic"}})
    assert len(data.train) + len(data.validation) + len(data.test) == len(RECORDS)


def test_labels_follow_the_spec_order_and_integer_labels_sort_numerically(
    model_dir: Path, tmp_path: Path, settings: RuntimeSettings
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    order = ["weather", "sports", "finance", "cooking"]
    data = _load(model_dir, path, settings, model={"uri": str(model_dir), "labels": order})
    assert data.labels == order
    assert [order[i] for i in data.test.label_ids] == [
        next(r["label"] for r in RECORDS if r["text"] == text) for text in data.test.texts
    ]
    assert infer_labels([10, 2, "1", 2.0]) == ["1", "2", "10"]


def _error(model_dir: Path, train: Path | str, settings: RuntimeSettings, **overrides: object) -> DataError:
    with pytest.raises(DataError) as caught:
        _load(model_dir, train, settings, **overrides)
    return caught.value


def test_missing_field_names_the_field(model_dir: Path, tmp_path: Path, settings: RuntimeSettings) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [*RECORDS[:5], {"text": "no label here"}])
    error = _error(model_dir, path, settings)
    assert error.where == "data.fields.label"
    assert "'label' is missing in example 6" in str(error)
    error = _error(model_dir, path, settings, data={"fields": {"text": "body"}})
    assert error.where == "data.fields.text"


def test_empty_data(model_dir: Path, tmp_path: Path, settings: RuntimeSettings) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    error = _error(model_dir, path, settings)
    assert error.where == "data.train"
    assert f"no examples in {path}" in str(error)
    too_small = write_jsonl(tmp_path / "few.jsonl", RECORDS[:4])
    assert _error(model_dir, too_small, settings).where == "data.split.validationFraction"


def test_unknown_label(model_dir: Path, tmp_path: Path, settings: RuntimeSettings) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [*RECORDS, {"text": "a poem", "label": "poetry"}])
    error = _error(model_dir, path, settings, model={"uri": str(model_dir), "labels": LABELS})
    assert error.where == "model.labels"
    assert "'poetry'" in str(error)
    assert str(path) in str(error)


def test_unreadable_or_missing_files(model_dir: Path, tmp_path: Path, settings: RuntimeSettings) -> None:
    missing = tmp_path / "nowhere.jsonl"
    error = _error(model_dir, missing, settings)
    assert (error.where, str(missing) in str(error)) == ("data.train", True)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    assert "cannot read" in str(_error(model_dir, broken, settings))
    invalid_json = tmp_path / "invalid.jsonl"
    invalid_json.write_text('{"text": "ok", "label": "sports"}\n{oops\n')
    assert "line 2 is not valid JSON" in str(_error(model_dir, invalid_json, settings))
    test_missing = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    error = _error(model_dir, test_missing, settings, data={"test": str(tmp_path / "gone.csv")})
    assert error.where == "data.test"


def test_unsupported_extension(model_dir: Path, tmp_path: Path, settings: RuntimeSettings) -> None:
    path = tmp_path / "train.txt"
    path.write_text("sports: the striker scored\n")
    error = _error(model_dir, path, settings)
    assert error.where == "data.format"
    assert "'.txt'" in str(error)
    # Naming the format reads the file whatever its extension.
    renamed = write_jsonl(tmp_path / "train.data", RECORDS)
    assert len(_load(model_dir, renamed, settings, data={"format": "jsonl"}).labels) == 4


def test_s3_files_and_prefixes(model_dir: Path, tmp_path: Path, settings: RuntimeSettings, s3_endpoint: str) -> None:
    from kubetune.runtime.io.storage import s3_client

    client = s3_client()
    client.create_bucket(Bucket="datasets")
    client.upload_file(str(write_jsonl(tmp_path / "a.jsonl", RECORDS[:40])), "datasets", "topics/a.jsonl")
    client.upload_file(str(write_csv(tmp_path / "b.csv", RECORDS[40:])), "datasets", "topics/b.csv")
    one_file = _load(model_dir, "s3://datasets/topics/a.jsonl", settings)
    assert len(one_file.train) + len(one_file.validation) + len(one_file.test) == 40
    prefix = _load(model_dir, "s3://datasets/topics", settings)
    assert len(prefix.train) + len(prefix.validation) + len(prefix.test) == len(RECORDS)
    error = _error(model_dir, "s3://datasets/absent.jsonl", settings)
    assert (error.where, "s3://datasets/absent.jsonl" in str(error)) == ("data.train", True)
