"""Datasets named by their Hub id (hf://datasets/<org>/<name>), read from the Hugging Face cache without a hub.

Each test writes its datasets into a hub cache of its own, laid out as a download leaves it
(`datasets--<org>--<name>/blobs`, `snapshots/<commit>/` linking into them, `refs/<branch or tag>`), with
the files `push_to_hub` writes: a dataset card naming the configurations, Parquet shards with the features.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubetune.runtime.contract import RunSpec
from kubetune.runtime.contract.report import Unavailable
from kubetune.runtime.data.load import load_data
from kubetune.runtime.data.plan_sources import data_is_local
from kubetune.runtime.io.errors import DataError, DatasetUnavailableError, InvalidRunError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.recipe.pipeline import run_pipeline

from .conftest import fast_options, finite, make_spec
from .topics import LABELS, make_examples

pytestmark = pytest.mark.runtime

TOPICS = "hf://datasets/acme/topics"
COMMIT_V1 = hashlib.sha1(b"topics v1").hexdigest()
COMMIT_V2 = hashlib.sha1(b"topics v2").hexdigest()


def _card(configs: dict[str, list[str]]) -> bytes:
    """A dataset card as push_to_hub writes it: each configuration's splits and their files."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    return ("\n".join([*lines, "---", "", "# A test dataset", ""])).encode()


def _parquet(records: list[dict[str, Any]], features: Any = None) -> bytes:
    """One Parquet shard as push_to_hub writes it (the features ride along in its schema)."""
    import io

    from datasets import Dataset

    buffer = io.BytesIO()
    Dataset.from_list(records, features=features).to_parquet(buffer)
    return buffer.getvalue()


def cache_dataset(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...]) -> Path:
    """The files of `repo_id` at `commit` in a hub cache, as hf_hub_download leaves them; `refs` point at it."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(Path(*[".."] * (len(Path(name).parts) + 1), "blobs", blob.name))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def topics_files(count: int) -> dict[str, bytes]:
    """acme/topics: labelled sentences (labels as a ClassLabel) in train and test splits."""
    from datasets import ClassLabel, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=sorted(LABELS))})
    examples = [{"text": e["text"], "label": sorted(LABELS).index(e["label"])} for e in make_examples(count, 7)]
    cut = count * 4 // 5
    return {
        "README.md": _card({"default": ["train", "test"]}),
        "default/train-00000-of-00001.parquet": _parquet(examples[:cut], features),
        "default/test-00000-of-00001.parquet": _parquet(examples[cut:], features),
    }


def chat_files() -> dict[str, bytes]:
    """acme/chats: an sft configuration (chat messages) and a pairs one (chat preference pairs)."""
    sft, pairs = [], []
    for example in make_examples(20, 3):
        user = {"role": "user", "content": f"topic of: {example['text']}"}
        sft.append({"messages": [user, {"role": "assistant", "content": example["label"]}]})
        pairs.append(
            {
                "chosen": [user, {"role": "assistant", "content": example["label"]}],
                "rejected": [user, {"role": "assistant", "content": "unknown"}],
            }
        )
    return {
        "README.md": _card({"sft": ["train"], "pairs": ["train"]}),
        "sft/train-00000-of-00001.parquet": _parquet(sft),
        "pairs/train-00000-of-00001.parquet": _parquet(pairs),
    }


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache that huggingface_hub and datasets use, offline; datasets prepares its Arrow files apart."""
    import datasets
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return cache


def tree(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `folder` (links not followed) with its mode, size and modification time."""
    entries = {}
    for path in [folder, *folder.rglob("*")]:
        info = path.lstat()
        entries[str(path.relative_to(folder))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return entries


def spec(tmp_path: Path, model: Path, **data: Any) -> RunSpec:
    return make_spec(model, TOPICS, tmp_path / "out", data={"train": TOPICS, **data})


def test_a_cached_dataset_loads_offline_with_its_splits_and_label_names(
    hub_cache: Path, tmp_path: Path, model_dir: Path
) -> None:
    cache_dataset(hub_cache, "acme/topics", COMMIT_V2, topics_files(100), ("main",))
    before = tree(hub_cache)
    run = spec(tmp_path, model_dir, test=TOPICS)
    data = load_data(run, RuntimeSettings(cache_dir=tmp_path / "cache"))
    assert tree(hub_cache) == before  # an image's cache may be read-only: nothing is written there
    # The test split is the dataset's own; validation is carved out of its train split.
    assert (len(data.train), len(data.validation), len(data.test)) == (72, 8, 20)
    assert data.labels == sorted(LABELS)  # the ClassLabel's names, not its ids
    # The lineage names the commit read (main pointed to it).
    read = f"{TOPICS}@{COMMIT_V2}"
    assert data.sources == {"train": read, "validation": f"{read}#validation", "test": read}
    assert data_is_local(run)  # `kubetune plan` reads a dataset the cache holds
    assert not data_is_local(spec(tmp_path, model_dir, hub={"revision": "v9"}))


def test_a_revision_and_sliced_splits_pick_the_data(hub_cache: Path, tmp_path: Path, model_dir: Path) -> None:
    cache_dataset(hub_cache, "acme/topics", COMMIT_V1, topics_files(40), ("v1",))
    cache_dataset(hub_cache, "acme/topics", COMMIT_V2, topics_files(100), ("main",))
    settings = RuntimeSettings(cache_dir=tmp_path / "cache")
    # A tag (refs/v1), a commit, the main branch (refs/main).
    for revision, commit, expected in (("v1", COMMIT_V1, 32), (COMMIT_V1, COMMIT_V1, 32), (None, COMMIT_V2, 80)):
        hub = {"revision": revision, "validationSplit": "train[:25%]", "testSplit": "test+train[:10%]"}
        data = load_data(spec(tmp_path, model_dir, validation=TOPICS, test=TOPICS, hub=hub), settings)
        assert (len(data.train), len(data.validation), len(data.test)) == (
            expected,
            expected // 4,
            expected // 4 + expected // 10,
        ), revision
        assert set(data.sources.values()) == {f"{TOPICS}@{commit}"}


def test_chat_records_and_preference_pairs_come_through_the_loaders(
    hub_cache: Path, tmp_path: Path, model_dir: Path
) -> None:
    cache_dataset(hub_cache, "acme/chats", COMMIT_V1, chat_files(), ("main",))
    settings = RuntimeSettings(cache_dir=tmp_path / "cache")
    chats = "hf://datasets/acme/chats"
    model = {"uri": str(model_dir), "task": "causal-lm"}
    sft = make_spec(model_dir, chats, tmp_path / "out", model=model, data={"train": chats, "hub": {"config": "sft"}})
    first = load_data(sft, settings).train.inputs[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    pairs = make_spec(
        model_dir,
        chats,
        tmp_path / "out",
        model=model,
        method={"type": "full", "objective": "dpo"},
        data={"train": chats, "hub": {"config": "pairs"}},
    )
    pair = load_data(pairs, settings).train.inputs[0]
    assert pair["prompt"][0]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
    # A field the records lack is named as a file's would be.
    wrong = sft.model_copy(update={"data": sft.data.model_copy(update={"fields": sft.data.fields.model_copy(
        update={"messages": "conversation"})})})  # fmt: skip
    with pytest.raises(DataError) as missing:
        load_data(wrong, settings)
    assert missing.value.where == "data.fields.prompt" and f"example 1 of {chats}" in str(missing.value)
    with pytest.raises(DataError) as no_config:
        load_data(sft.model_copy(update={"data": sft.data.model_copy(update={"hub": None})}), settings)
    assert no_config.value.where == "data.hub.config"
    assert "several configurations" in str(no_config.value) and "sft" in str(no_config.value)


def test_images_come_as_their_bytes(hub_cache: Path, tmp_path: Path, model_dir: Path) -> None:
    import io

    from datasets import ClassLabel, Features, Image
    from PIL import Image as PilImage

    def png(shade: int) -> bytes:
        buffer = io.BytesIO()
        PilImage.new("RGB", (8, 8), (shade, shade, shade)).save(buffer, format="PNG")
        return buffer.getvalue()

    features = Features({"image": Image(), "label": ClassLabel(names=["dark", "light"])})
    records = [{"image": {"bytes": png(40 + 200 * (i % 2)), "path": None}, "label": i % 2} for i in range(40)]
    files = {
        "README.md": _card({"default": ["train"]}),
        "default/train-00000-of-00001.parquet": _parquet(records, features),
    }
    cache_dataset(hub_cache, "acme/shades", COMMIT_V1, files, ("main",))
    shades = "hf://datasets/acme/shades"
    run = make_spec(model_dir, shades, tmp_path / "out", model={"uri": str(model_dir), "task": "image-classification"})
    data = load_data(run, RuntimeSettings(cache_dir=tmp_path / "cache"))
    assert data.labels == ["dark", "light"]
    assert all(isinstance(image, bytes) and image.startswith(b"\x89PNG") for image in data.train.inputs)


def test_what_is_missing_is_named(hub_cache: Path, tmp_path: Path, model_dir: Path) -> None:
    cache_dataset(hub_cache, "acme/topics", COMMIT_V2, topics_files(40), ("main",))
    settings = RuntimeSettings(cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as no_split:
        load_data(spec(tmp_path, model_dir, validation=TOPICS), settings)
    assert no_split.value.where == "data.hub.validationSplit"
    assert "no split 'validation'; its splits are: train, test" in str(no_split.value)
    with pytest.raises(DataError) as no_config:
        load_data(spec(tmp_path, model_dir, hub={"config": "tiny"}), settings)
    assert no_config.value.where == "data.hub.config" and "has: default" in str(no_config.value)
    missing = "hf://datasets/acme/not-cached"
    with pytest.raises(DatasetUnavailableError) as offline:
        load_data(make_spec(model_dir, missing, tmp_path / "out"), settings)
    assert (offline.value.what, offline.value.where) == (Unavailable.MODEL_HUB, "data.train")
    assert f"{missing} is not in the Hugging Face cache at {hub_cache}" in str(offline.value)
    assert "hf download --repo-type dataset acme/not-cached" in str(offline.value)


HUB_VARIABLES = (
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE",
    "HF_HOME",
    "HF_DATASETS_CACHE",
)
# Loads each run spec's data as a run does and prints what happened, as JSON.
LOADER = """
import json, sys, time
from kubetune.runtime.contract import RunSpec
from kubetune.runtime.data.load import load_data
from kubetune.runtime.io.errors import DataError, UnavailableError
from kubetune.runtime.io.settings import RuntimeSettings

outcomes = []
for document in sys.argv[1:]:
    started = time.monotonic()
    try:
        data = load_data(RunSpec.model_validate_json(document), RuntimeSettings())
        outcome = {"examples": [len(data.train), len(data.validation), len(data.test)], "train": data.sources["train"]}
    except UnavailableError as error:
        outcome = {"unavailable": error.what.value, "where": error.where, "message": str(error)}
    except DataError as error:
        outcome = {"invalid": error.where, "message": str(error)}
    outcome["seconds"] = time.monotonic() - started
    outcomes.append(outcome)
print(json.dumps(outcomes))
"""


def load_in_fresh_python(specs: list[RunSpec], tmp_path: Path, cache: Path, endpoint: str) -> list[dict[str, Any]]:
    """An outcome per spec of loading its data in a new process that may ask the hub at `endpoint`.

    huggingface_hub and datasets read the hub's address and offline mode once, when imported, as in a pod.
    """
    env = {k: v for k, v in os.environ.items() if k not in HUB_VARIABLES}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": endpoint}
    documents = [spec.model_dump_json(by_alias=True, exclude_none=True) for spec in specs]
    finished = subprocess.run(
        [sys.executable, "-c", LOADER, *documents], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    outcomes: list[dict[str, Any]] = json.loads(finished.stdout.strip().splitlines()[-1])
    return outcomes


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _TestHub(BaseHTTPRequestHandler):
    """The hub's 404 RepoNotFound for missing-org's datasets, 503 for every other request."""

    def do_HEAD(self) -> None:
        if "/missing-org/" in self.path:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
        else:
            self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.do_HEAD()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def test_hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TestHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_where_the_hub_does_not_answer_the_cache_serves_or_the_run_is_retried(
    hub_cache: Path, tmp_path: Path, model_dir: Path
) -> None:
    cache_dataset(hub_cache, "acme/topics", COMMIT_V2, topics_files(40), ("main",))
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    missing = "hf://datasets/acme/not-cached"
    cached, not_cached = load_in_fresh_python(
        [spec(tmp_path, model_dir, test=TOPICS), make_spec(model_dir, missing, tmp_path / "out")],
        tmp_path,
        hub_cache,
        endpoint,
    )
    assert cached["examples"] == [28, 4, 8], cached  # validation carved out of train per label
    assert cached["train"] == f"{TOPICS}@{COMMIT_V2}"
    assert (not_cached["unavailable"], not_cached["where"]) == ("ModelHub", "data.train")
    assert f"cannot reach the dataset hub at {endpoint} for {missing}" in not_cached["message"]
    assert not_cached["seconds"] < 15  # three tries a few seconds apart, not huggingface_hub's minutes of retries


def test_a_dataset_the_hub_lacks_is_invalid_and_a_busy_hub_unavailable(
    hub_cache: Path, test_hub: str, tmp_path: Path, model_dir: Path
) -> None:
    missing, busy = "hf://datasets/missing-org/no-such-data", "hf://datasets/busy-org/data"
    specs = [make_spec(model_dir, uri, tmp_path / "out") for uri in (missing, busy)]
    invalid, unavailable = load_in_fresh_python(specs, tmp_path, hub_cache, test_hub)
    assert invalid["invalid"] == "data.train" and "doesn't exist on the Hub" in invalid["message"], invalid
    assert (unavailable["unavailable"], unavailable["where"]) == ("ModelHub", "data.train")
    assert f"cannot reach the dataset hub at {test_hub} for {busy} (HTTP 503" in unavailable["message"]


def test_a_short_run_trains_on_a_hub_dataset(
    ray_session: str, hub_cache: Path, tmp_path: Path, tiny_bert_dir: Path
) -> None:
    cache_dataset(hub_cache, "acme/topics", COMMIT_V2, topics_files(80), ("main",))
    run = make_spec(
        tiny_bert_dir,
        TOPICS,
        tmp_path / "out",
        method={"type": "full"},
        data={"train": TOPICS, "test": TOPICS, "hub": {"revision": COMMIT_V2}},
        hyperparameters={"epochs": 1},
        compression={"quantization": {"method": "none"}},
    )
    result = run_pipeline(run, fast_options(tmp_path / "out"))
    assert set(finite(result.metrics_after)) >= {"accuracy", "loss"}
    manifest = json.loads(Path(result.manifest_uri or "").read_text())
    assert manifest["lineage"]["data"]["train"] == f"{TOPICS}@{COMMIT_V2}"


def test_chat_data_without_a_chat_template_is_refused_before_training(
    hub_cache: Path, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    from transformers import AutoTokenizer

    no_template = tmp_path / "no-template"
    for file in tiny_llama_dir.iterdir():
        (no_template / file.name).parent.mkdir(parents=True, exist_ok=True)
        (no_template / file.name).write_bytes(file.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(no_template)
    tokenizer.chat_template = None
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(no_template)
    assert not AutoTokenizer.from_pretrained(no_template).chat_template
    cache_dataset(hub_cache, "acme/chats", COMMIT_V1, chat_files(), ("main",))
    chats = "hf://datasets/acme/chats"
    model = {"uri": str(no_template), "task": "causal-lm"}
    for config, method, field in (
        ("sft", {"type": "full"}, "data.fields.messages"),
        ("pairs", {"type": "full", "objective": "dpo"}, "data.fields.chosen"),
    ):
        run = make_spec(
            no_template,
            chats,
            tmp_path / "out",
            model=model,
            method=method,
            data={"train": chats, "hub": {"config": config}},
        )
        started = time.monotonic()
        with pytest.raises(InvalidRunError) as refused:
            run_pipeline(run, fast_options(tmp_path / "out"))
        assert time.monotonic() - started < 30  # before the base model's evaluation, let alone training
        assert refused.value.where == f"model.uri, {field}"
        assert f"tokenizer of {no_template} has no chat template" in str(refused.value)
        assert "prompt/completion" in str(refused.value)
    # The tiny Llama's own tokenizer has one: the same data passes the check.
    from kubetune.runtime.data.chat import check_chat_template

    run = make_spec(tiny_llama_dir, chats, tmp_path / "out", model={"uri": str(tiny_llama_dir), "task": "causal-lm"},
                    data={"train": chats, "hub": {"config": "sft"}})  # fmt: skip
    check_chat_template(AutoTokenizer.from_pretrained(tiny_llama_dir), run, load_data(run, RuntimeSettings()))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .tiny import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
