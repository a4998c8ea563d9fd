"""`kubetune run` and `kubetune serve` as a user runs them: processes, their console, their endpoint.

The first test is the README's main command on a copy of the repository's files, in a
virtual environment the command creates itself; the others run the other examples with
this environment's `kubetune`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..integration.test_operator_restarts import free_port
from .s3server import s3_endpoint

pytestmark = pytest.mark.runtime
__all__ = ["s3_endpoint"]  # a fixture, used by name

ROOT = Path(__file__).resolve().parents[2]
KUBETUNE = Path(sys.executable).with_name("kubetune")
# What libraries print and kubetune never does: Ray's log prefixes and actor tags, Python's log
# levels and warnings, tracebacks, transformers' reports and tqdm's bars.
LIBRARY_LINE = re.compile(
    r"\(pid=|\bpid=\d+\)|^(INFO|WARNING|ERROR|DEBUG)\b|\b(INFO|WARNING|ERROR)\s+\d{4}-\d\d-\d\d|Traceback|"
    r"Warning:|warnings\.warn|\[transformers\]|LOAD REPORT|Loading weights|it/s\]|^\s*File \"|raylet|ray\.|"
    r"torch\._|I\d{4} \d\d:\d\d|W\d{4} \d\d:\d\d"
)
# Lines the set-up prints before the command starts (a fresh clone creates its environment).
SETUP_LINE = re.compile(r"^(creating |installing kubetune)")
READY_TIMEOUT_S = 1500.0


class Process:
    """A command whose output lines are collected as they come (a reader thread per stream)."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )  # fmt: skip
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.err), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first stdout line matching `pattern`; fails if the process ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.out):
                if re.search(pattern, line):
                    return line
            if self.popen.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.text()}")

    def interrupt(self, timeout: float = 90.0) -> int:
        """Ctrl-C as a terminal sends it: SIGINT to the whole process group."""
        os.killpg(self.popen.pid, signal.SIGINT)
        code = self.popen.wait(timeout)
        for reader in self.readers:
            reader.join(10)
        return code

    def finish(self, timeout: float) -> int:
        code = self.popen.wait(timeout)
        for reader in self.readers:
            reader.join(10)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)

    def text(self) -> str:
        return "\n".join(["--- stdout", *self.out, "--- stderr", *self.err])


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Processes a test starts; any still running at its end get Ctrl-C, then SIGKILL."""
    started: list[Process] = []
    yield started
    for process in started:
        if process.popen.poll() is None:
            try:
                process.interrupt(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def readme_main_command() -> str:
    """The first command of the README's quick start."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme[readme.index("## Quick start") :]
    block = quick_start[quick_start.index("```bash") + len("```bash") :]
    return block.strip().splitlines()[0].split("#")[0].strip()


def tracked_copy(destination: Path) -> Path:
    """The repository's files as a fresh clone of this tree has them (no venv, no outputs)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    )  # fmt: skip
    for name in listed.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=120) as response:
        return json.loads(response.read().decode())


def library_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if LIBRARY_LINE.search(line) and not SETUP_LINE.match(line)]


def processes_of(folder: Path) -> dict[int, str]:
    """Running processes started from `folder` (e.g. its venv's Ray): pid to command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and str(folder) in command:
            found[int(entry.name)] = command
    return found


def test_readme_main_command_fine_tunes_and_serves_the_example(tmp_path: Path, processes: list[Process]) -> None:
    """A new user's first command: its own venv, the example trained and served, a clean console, Ctrl-C."""
    clone = tracked_copy(tmp_path / "kubetune")
    try:
        _run_the_main_command(clone, tmp_path, processes)
    finally:
        for pid in processes_of(clone):  # e.g. Serve's HAProxy, if the command was killed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _run_the_main_command(clone: Path, tmp_path: Path, processes: list[Process]) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KUBETUNE_", "VIRTUAL_ENV"))}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty Hugging Face cache: the command fills it
    command = readme_main_command()
    assert command == "scripts/example"
    started = time.monotonic()
    process = Process(["bash", command, "--port", str(port)], clone, env)
    processes.append(process)
    ready = process.wait_for(r"^ready http://", READY_TIMEOUT_S)
    url = ready.split()[1]
    assert url == f"http://127.0.0.1:{port}/v1/predict"
    print(f"from start (with the venv) to served: {time.monotonic() - started:.0f} s")

    tickets = {
        "Why was I billed twice on my credit card this month?": "billing",
        "My parcel never arrived": "delivery",
        "I forgot my password and can't log in": "account",
        "The app crashes every time I open it": "technical",
    }
    answer = post(url, {"inputs": list(tickets)})
    assert [p["label"] for p in answer["predictions"]] == list(tickets.values()), answer
    assert process.interrupt() == 0, process.text()

    out = process.out
    assert (clone / ".venv" / "bin" / "kubetune").exists()  # the command made its environment
    expected_lines = ("load", "evaluate-base", "epoch 1/", "test-after", "int8:", "results (test set)",
                      "baseline (tfidf-logistic-regression)", "promoted:")  # fmt: skip
    for expected in expected_lines:
        assert any(expected in line for line in out), f"{expected!r} missing:\n{process.text()}"
    assert any(line.strip().startswith("curl -s http://127.0.0.1") for line in out)
    assert out[-1] == "stopped", process.text()
    assert library_lines(out + process.err) == [], process.text()
    log = (clone / "kubetune-output" / "text-classification" / "kubetune.log").read_text(encoding="utf-8")
    assert library_lines(log.splitlines()), "the libraries' output went to the log file"
    assert processes_of(clone / ".venv") == {}, "Ray stopped with the command"


def _documents_of(path: Path) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(path.read_text(encoding="utf-8")))


def _examples_folder(tmp_path: Path) -> Path:
    """A working folder like the repository's root: the examples, and what examples/prepare.py writes."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    prepare = [sys.executable, "examples/prepare.py", str(work / "kubetune-output" / "examples")]
    subprocess.run(prepare, cwd=work, check=True, capture_output=True, timeout=600)
    return work


def _local_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_causal_lm_example_runs_and_kubetune_serve_answers_chat(tmp_path: Path, processes: list[Process]) -> None:
    work = _examples_folder(tmp_path)
    output = tmp_path / "lm-run"
    run = Process(
        [str(KUBETUNE), "run", "examples/causal-lm/finetunejob.yaml", "--no-serve", "--output", str(output)],
        work, _local_env(),
    )  # fmt: skip
    processes.append(run)
    assert run.finish(900) == 0, run.text()
    assert any("results (test set)" in line for line in run.out) and any("perplexity" in line for line in run.out)
    assert any("no classical baseline: causal-lm" in line for line in run.out), run.text()
    assert library_lines(run.out + run.err) == [], run.text()
    manifest = json.loads((output / "kubetune.json").read_text())
    assert manifest["task"] == "causal-lm"

    port = free_port()
    serve = Process([str(KUBETUNE), "serve", str(output), "--port", str(port)], work, _local_env())
    processes.append(serve)
    serve.wait_for(r"^ready http://", 600)
    answer = post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Where is my order?"}], "max_tokens": 8},
    )
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    assert serve.interrupt() == 0, serve.text()
    assert serve.out[-1] == "stopped"


def test_image_example_runs_without_serving(tmp_path: Path, processes: list[Process]) -> None:
    work = _examples_folder(tmp_path)
    output = tmp_path / "digits-run"
    run = Process(
        [str(KUBETUNE), "run", "examples/image-classification/finetunejob.yaml", "--no-serve", "--output",
         str(output), "--workers", "1"],
        work, _local_env(),
    )  # fmt: skip
    processes.append(run)
    assert run.finish(900) == 0, run.text()
    assert any("kubetune run FineTuneJob" in line and "1 worker(s)" in line for line in run.out)
    assert library_lines(run.out + run.err) == [], run.text()
    manifest = json.loads((output / "kubetune.json").read_text())
    assert manifest["metrics"]["after"]["accuracy"] > manifest["metrics"]["before"]["accuracy"] + 0.3
    assert not any(line.startswith("ready") for line in run.out)


def test_a_run_that_cannot_work_says_which_field_and_where_the_log_is(tmp_path: Path) -> None:
    job = (ROOT / "examples" / "text-classification" / "finetunejob.yaml").read_text(encoding="utf-8")
    broken = tmp_path / "job.yaml"
    broken.write_text(re.sub(r"train: \S+", f"train: {tmp_path / 'missing.jsonl'}", job, count=1))
    result = subprocess.run(
        [str(KUBETUNE), "run", str(broken), "--output", str(tmp_path / "out")],
        cwd=ROOT, env=_local_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert "data.train" in result.stderr and "missing.jsonl" in result.stderr
    assert f"details in {tmp_path / 'out' / 'kubetune.log'}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_busy_port_is_reported_before_any_training(tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [str(KUBETUNE), "run", "examples/text-classification/finetunejob.yaml", "--port", str(port),
             "--output", str(tmp_path / "out")],
            cwd=ROOT, env=_local_env(), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert result.returncode == 2, result
    assert f"port {port} (--port) is in use" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_local_run_reads_and_writes_s3_with_credentials_from_the_environment(
    s3_endpoint: str, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="tickets")
    client.upload_file(str(ROOT / "examples" / "text-classification" / "tickets.jsonl"), "tickets", "data/train.jsonl")
    job = _documents_of(ROOT / "examples" / "text-classification" / "finetunejob.yaml")[0]
    job["spec"]["model"]["uri"] = str(tiny_bert_dir)  # fast: the point here is where data and results live
    job["spec"]["data"]["train"] = "s3://tickets/data/train.jsonl"
    job["spec"]["hyperparameters"]["epochs"] = 1
    job["spec"]["promotion"] = {"minImprovement": -1.0}
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job), encoding="utf-8")
    result = subprocess.run(
        [str(KUBETUNE), "run", str(manifest), "--no-serve", "--workers", "1", "--output", "s3://tickets/runs/one"],
        cwd=tmp_path, env={**os.environ, **_local_env()}, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    keys = {item["Key"] for item in client.list_objects_v2(Bucket="tickets", Prefix="runs/one/")["Contents"]}
    assert {"runs/one/kubetune.json", "runs/one/variants/merged/config.json"} <= keys
    assert "s3://tickets/runs/one" in result.stdout
    # The output is remote, so the libraries' log stays on this machine, named after the job.
    assert library_lines((tmp_path / "kubetune-output" / "support-tickets.log").read_text().splitlines())
