"""hf:// models without a reachable hub: an image's read-only cache, offline mode, a hub that is down or absent.

Each case runs in a fresh Python: huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE
once, when it is imported, as it does in a pod.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubetune.runtime.contract.report import Unavailable
from kubetune.runtime.data.hub import HubSetup, hub_unreachable, is_unavailable, unreachable_reason
from kubetune.runtime.io.errors import ModelUnavailableError, unavailable_cause
from kubetune.runtime.recipe.pipeline import run_pipeline
from kubetune.runtime.reporting.base import JsonLinesReporter, read_events

from ..conftest import REPO_ROOT
from .conftest import fast_options, make_spec, spec_document

pytestmark = pytest.mark.runtime

MINILM = "hf://sentence-transformers/all-MiniLM-L6-v2"
NOT_CACHED = "hf://kubetune-tests/not-cached"
MISSING = "hf://missing-org/no-such-model"  # the test hub answers 404 RepoNotFound
BUSY = "hf://busy-org/model"  # the test hub answers 503
HUB_VARIABLES = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_HOME")
# Loads each URI as a run's stage does and prints what happened, as JSON.
LOADER = """
import json, sys, time
from kubetune.runtime.contract import Method, ModelSource
from kubetune.runtime.io.errors import ModelError, ModelUnavailableError
from kubetune.runtime.models import build_model
from kubetune.runtime.io.settings import RuntimeSettings

outcomes = []
for uri in sys.argv[1:]:
    started = time.monotonic()
    try:
        model, _ = build_model(ModelSource(uri=uri), Method(type="full"), ["a", "b"], 1, RuntimeSettings())
        outcome = {"loaded": type(model).__name__}
    except ModelUnavailableError as error:
        outcome = {"unavailable": error.what.value, "where": error.where, "message": str(error)}
    except ModelError as error:
        outcome = {"invalid": error.where, "message": str(error)}
    outcome["seconds"] = time.monotonic() - started
    outcomes.append(outcome)
print(json.dumps(outcomes))
"""


def load_in_fresh_python(uris: list[str], tmp_path: Path, **hub_env: str) -> tuple[list[dict[str, Any]], str]:
    """(an outcome per URI, stderr) of loading the URIs in a new process with only these hub variables."""
    env = {k: v for k, v in os.environ.items() if k not in HUB_VARIABLES}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "TOKENIZERS_PARALLELISM": "false", **hub_env}
    finished = subprocess.run(
        [sys.executable, "-c", LOADER, *uris], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    outcomes: list[dict[str, Any]] = json.loads(finished.stdout.strip().splitlines()[-1])
    return outcomes, finished.stderr


def seeded_cache(folder: Path) -> Path:
    """A hub cache holding MiniLM, laid out as scripts/seed_hf_cache.py lays it out (and an image would)."""
    subprocess.run([sys.executable, REPO_ROOT / "scripts" / "seed_hf_cache.py", folder], check=True, timeout=120)
    return folder


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _TestHub(BaseHTTPRequestHandler):
    """404 RepoNotFound for missing-org's repositories (as the hub says it), 503 for everything else."""

    def do_HEAD(self) -> None:
        if self.path.startswith("/missing-org/"):
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


def tree(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `folder` (links not followed) with its mode, size and modification time."""
    entries = {}
    for path in [folder, *folder.rglob("*")]:
        info = path.lstat()
        entries[str(path.relative_to(folder))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return entries


def make_read_only(folder: Path) -> None:
    """No write permission on the cache's folders and files (its links point into the installed package)."""
    for path in [*sorted(folder.rglob("*"), reverse=True), folder]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_an_image_cache_outside_the_pods_emptydir_serves_offline_and_is_never_written(tmp_path: Path) -> None:
    """The image sets HF_HUB_CACHE to a read-only folder and the pods HF_HOME to their emptyDir."""
    cache = seeded_cache(tmp_path / "image" / "hf-cache" / "hub")
    make_read_only(tmp_path / "image")
    before = tree(tmp_path / "image")
    try:
        outcomes, _ = load_in_fresh_python([MINILM, NOT_CACHED], tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    finally:
        after = tree(tmp_path / "image")
        for path in [tmp_path / "image", *(tmp_path / "image").rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert after == before  # nothing was written there, not even a lock file
    loaded, missing = outcomes
    assert loaded["loaded"] == "BertForSequenceClassification"
    assert (missing["unavailable"], missing["where"]) == ("ModelHub", "model.uri")
    assert f"{NOT_CACHED} is not in the Hugging Face cache at {cache}" in missing["message"]
    assert "offline mode (HF_HUB_OFFLINE)" in missing["message"] and "HF_HUB_CACHE" in missing["message"]


def test_an_unreachable_hub_fails_fast_and_a_cached_model_still_loads(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    cache = seeded_cache(tmp_path / "hub")
    outcomes, stderr = load_in_fresh_python(
        [MINILM, NOT_CACHED], tmp_path, HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache)
    )
    cached, missing = outcomes
    assert cached["loaded"] == "BertForSequenceClassification"
    assert "[Retry " not in stderr  # huggingface_hub never retried: the cache was read without asking
    assert (missing["unavailable"], missing["where"]) == ("ModelHub", "model.uri")
    assert f"cannot reach the model hub at {endpoint} for {NOT_CACHED}" in missing["message"]
    # Three tries, a few seconds apart, instead of huggingface_hub's ~95 s of retries; each retry is logged.
    assert missing["seconds"] < 15
    retries = [
        line for line in stderr.splitlines() if f"model hub {endpoint} did not answer for kubetune-tests" in line
    ]
    assert [("attempt 1 of 3" in line, "attempt 2 of 3" in line) for line in retries] == [(True, False), (False, True)]


def test_a_missing_repository_stays_invalid_and_a_busy_hub_is_unavailable(tmp_path: Path, test_hub: str) -> None:
    outcomes, _ = load_in_fresh_python(
        [MISSING, BUSY], tmp_path, HF_ENDPOINT=test_hub, HF_HUB_CACHE=str(tmp_path / "c")
    )
    missing, busy = outcomes
    assert missing["invalid"] == "model.uri" and "not a valid model identifier" in missing["message"]
    assert busy["unavailable"] == "ModelHub" and f"cannot reach the model hub at {test_hub}" in busy["message"]
    assert "HTTP 503" in busy["message"]


def test_the_hub_is_there_when_it_answers_anything_but_a_server_error(test_hub: str) -> None:
    assert unreachable_reason(f"{test_hub}/missing-org/x/resolve/main/config.json", 5.0) is None
    assert unreachable_reason(f"{test_hub}/busy-org/x/resolve/main/config.json", 5.0) == "HTTP 503 Service Unavailable"
    assert "refused" in (unreachable_reason(f"http://127.0.0.1:{closed_port()}/x", 5.0) or "").lower()


def test_each_retry_of_the_hub_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    waits: list[float] = []
    with caplog.at_level(logging.WARNING, logger="kubetune.runtime.data.hub"):
        reason = hub_unreachable("org/model", None, HubSetup(endpoint, False, "/cache"), sleep=waits.append)
    assert reason is not None and waits == [1.0, 2.0]
    assert [r.getMessage().split("(")[1].split(":")[0] for r in caplog.records] == ["attempt 1 of 3", "attempt 2 of 3"]


def test_which_load_failures_mean_the_hub_is_unavailable() -> None:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import httpx  # type: ignore[attr-defined]

    request = httpx.Request("HEAD", "http://hub/org/m/resolve/main/config.json")

    def http_error(kind: type[HfHubHTTPError], status: int) -> OSError:
        wrapped = OSError("cannot load")  # transformers raises an OSError from the hub's error
        wrapped.__cause__ = kind(f"{status}", response=httpx.Response(status, request=request))
        return wrapped

    cases = {
        "no answer, not cached": (OSError("couldn't connect"), LocalEntryNotFoundError("not cached")),
        "connection refused mid-way": (httpx.ConnectError("refused", request=request), None),
        "server error": (http_error(HfHubHTTPError, 502), None),
        "rate limited": (http_error(HfHubHTTPError, 429), None),
    }
    for name, (error, cause) in cases.items():
        if cause is not None:
            error.__cause__ = cause
        assert is_unavailable(error), name
    for error in (http_error(RepositoryNotFoundError, 404), http_error(HfHubHTTPError, 403), OSError("no such dir")):
        assert not is_unavailable(error), error


def test_an_unavailable_model_crosses_ray_and_reaches_the_report(tmp_path: Path, topics_jsonl: Path) -> None:
    from ray.exceptions import RayTaskError

    error = ModelUnavailableError(Unavailable.MODEL_HUB, "model.uri", "cannot reach the model hub at http://h")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.what, copy.where, str(copy)) == (error.what, error.where, str(error))
    wrapped = RayTaskError("evaluate_base", "Traceback ...", copy).as_instanceof_cause()  # type: ignore[no-untyped-call]
    found = unavailable_cause(wrapped)
    assert found is not None and (found.what, found.where, str(found)) == (error.what, error.where, str(error))

    # Offline (as this tier runs) with the model in no cache: the run fails, reporting what it could not reach.
    spec = make_spec(tmp_path, topics_jsonl, tmp_path / "out", model={"uri": NOT_CACHED})
    events_file = tmp_path / "events.jsonl"
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError):
        run_pipeline(spec, fast_options(tmp_path / "out"), JsonLinesReporter(events_file))
    assert time.monotonic() - started < 60
    (failed,) = [event for event in read_events(events_file) if event["event"] == "failed"]
    assert failed["unavailable"] == "ModelHub" and failed["invalidField"] is None
    assert failed["message"].startswith(f"model.uri: {NOT_CACHED} is not in the Hugging Face cache")


def test_the_entry_point_fails_an_unavailable_model_for_a_retry(tmp_path: Path, topics_jsonl: Path) -> None:
    """Exit status 1 (KubeRay retries the run), not 2 (invalid); the message is the runtime's own."""
    document = spec_document(tmp_path, topics_jsonl, tmp_path / "out", model={"uri": NOT_CACHED})
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"spec": document}))
    events = tmp_path / "events.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KUBETUNE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    finished = subprocess.run(
        [sys.executable, "-m", "kubetune.runtime.recipe.finetune", "--config", config, "--events", events],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert f"run failed: model.uri: {NOT_CACHED} is not in the Hugging Face cache" in finished.stderr
    (failed,) = [event for event in read_events(events) if event["event"] == "failed"]
    assert failed["unavailable"] == "ModelHub"
