"""From `kubetune run` to the first served answer, split by stage, against the 2-minute budget.

Runs the quick start's example (`kubetune run examples/text-classification/finetunejob.yaml`)
as the README's main command does, with this environment's packages already installed
(warm caches), and times each stage from the run's own events (`events.jsonl` next to its
log): start-up (Python, Ray), data, base evaluation, training, evaluation, compression,
export, then the Serve application's start and the first answer. The ratio is the time to
the first answer against the budget, so below 1.00 meets it. Each repeat is a fresh process.

    python bench/local_run.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/text-classification/finetunejob.yaml"
BUDGET_S = 120.0
STAGES = ["load", "evaluate-base", "train", "evaluate", "compress", "export"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_run(output: Path) -> dict[str, float]:
    """Seconds per stage of one `kubetune run`, from its start to its first served answer."""
    subprocess.run([sys.executable, "scripts/seed_hf_cache.py"], cwd=ROOT, check=True, capture_output=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(Path(sys.executable).with_name("kubetune")), "run", EXAMPLE, "--output", str(output)]
    command += ["--port", str(_free_port())]
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    ready: dict[str, Any] = {}

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("ready http://"):
                ready["at"], ready["url"] = time.time(), line.split()[1]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while "at" not in ready:
            if process.poll() is not None:
                raise RuntimeError(f"kubetune run exited with {process.returncode} before serving")
            time.sleep(0.2)
        # The command itself answered one request before printing `ready`; this is a client's first.
        request = urllib.request.Request(
            ready["url"],
            json.dumps({"inputs": "My parcel never arrived"}).encode(),
            {"Content-Type": "application/json"},
        )
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=60).read()
        answered = time.time()
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(120)
    events = [json.loads(line) for line in (output / "events.jsonl").read_text().splitlines()]
    starts = {event["stage"]: event["time"] for event in events if event["event"] == "stage"}
    finished = next(event["time"] for event in events if event["event"] == "result")
    times = [starts[stage] for stage in STAGES] + [finished, ready["at"], answered]
    split = {"start-up (Python, Ray)": starts["load"] - started}
    for index, stage in enumerate(STAGES):
        split[stage] = times[index + 1] - times[index]
    split["serve start (to ready)"] = ready["at"] - finished
    split["first answer"] = answered - ready["at"]
    split["total"] = answered - started
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs; the median and spread are shown")
    arguments = parser.parse_args()
    runs = []
    for repeat in range(arguments.repeats):
        with tempfile.TemporaryDirectory() as folder:
            runs.append(one_run(Path(folder) / "out"))
        print(f"run {repeat + 1}: {runs[-1]['total']:.1f} s", flush=True)
    print(f"\n{'stage':<26}{'seconds':>10}  spread")
    for stage in runs[0]:
        values = [run[stage] for run in runs]
        spread = f"{min(values):.1f} to {max(values):.1f}" if len(values) > 1 else ""
        print(f"{stage:<26}{statistics.median(values):>10.1f}  {spread}")
    total = statistics.median(run["total"] for run in runs)
    verdict = "within" if total <= BUDGET_S else "over"
    print(f"\nfirst served answer / {BUDGET_S:.0f} s budget: {total / BUDGET_S:.2f} ({verdict})")


if __name__ == "__main__":
    if not re.match(r"3\.11", sys.version):
        raise SystemExit("kubetune needs Python 3.11")
    main()
