"""What the journey tests use on the real node: reading objects, timing stages, and clients of an endpoint.

The machine is the node, so the tests reach a Service's ClusterIP directly (through
kube-proxy's rules, as a pod would) and run client pods for what only a pod can show
(the cluster's DNS names).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..controlplane.realnode import RealNode
from ..integration.harness import eventually
from .stack import Stack

Manifest = dict[str, Any]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CACHE = "/home/ray/.cache"  # the runtime image's writable cache (label io.kubetune.writable-paths)


def get(node: RealNode, kind: str, name: str, namespace: str) -> Manifest | None:
    proc = node.kubectl("get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found")
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def items(node: RealNode, kind: str, namespace: str, *selector: str) -> list[Manifest]:
    args = ["get", kind, "-n", namespace, "-o", "json", *(("-l", ",".join(selector)) if selector else ())]
    return list(json.loads(node.kubectl(*args).stdout)["items"])


def condition(body: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any]:
    for item in ((body or {}).get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            return dict(item)
    return {}


def wait_for(
    probe: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    interval: float = 1.0,
    diagnose: Callable[[], str] | None = None,
) -> Any:
    """Poll until `probe` gives something truthy (every second: these waits are long); fail naming `what`."""
    return eventually(probe, timeout=timeout, interval=interval, what=what, diagnose=diagnose)


def describe(node: RealNode, namespace: str) -> str:
    """What a failing journey step shows: the namespace's objects, events and the node's logs."""
    parts = []
    for args in (
        ("get", "finetunejobs,modeldeployments,rayjobs,rayclusters,rayservices,pods", "-n", namespace, "-o", "wide"),
        ("get", "events", "-n", namespace, "--sort-by=.lastTimestamp"),
    ):
        try:
            parts.append(node.kubectl(*args).stdout[-6000:])
        except Exception as error:  # diagnostics never hide the failure itself
            parts.append(f"{' '.join(args)}: {error}")
    parts.append(node.logs(20))
    return "\n".join(parts)


@dataclass
class Milestones:
    """When things were first seen, in seconds since `start`."""

    start: float = field(default_factory=time.monotonic)
    seen: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.seen.setdefault(name, round(time.monotonic() - self.start, 1))

    def table(self) -> str:
        return "\n".join(
            f"  {seconds:7.1f} s  {name}" for name, seconds in sorted(self.seen.items(), key=lambda i: i[1])
        )


# What the journey measured, by what was timed: printed at the end of the session.
FIGURES: dict[str, Milestones] = {}


def service_url(node: RealNode, namespace: str, service: str, port: int) -> str:
    body = get(node, "service", service, namespace)
    assert body is not None, f"Service {namespace}/{service} not found"
    return f"http://{body['spec']['clusterIP']}:{port}"


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no HTTP answer at all
    body: Any
    seconds: float
    error: str = ""


def post(url: str, payload: Mapping[str, Any], token: str | None = None, timeout: float = 30.0) -> Answer:
    """One JSON POST; never raises for what the endpoint answers or for a refused connection."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, json.dumps(payload).encode(), headers, method="POST")
    began = time.monotonic()
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Answer(response.status, json.loads(response.read() or b"null"), time.monotonic() - began)
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        return Answer(error.code, text, time.monotonic() - began, text[:300])
    except (OSError, ValueError) as error:
        return Answer(0, None, time.monotonic() - began, repr(error)[:300])


class ClientLoop:
    """`clients` threads posting `payload` to `url` back to back until stopped; every answer is kept."""

    def __init__(self, url: str, payload: Mapping[str, Any], token: str | None, clients: int = 1, pause: float = 0.0):
        self.url, self.payload, self.token, self.pause = url, payload, token, pause
        self.answers: list[tuple[float, Answer]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        self._lock = threading.Lock()

    def _run(self) -> None:
        while not self._stop.is_set():
            answer = post(self.url, self.payload, self.token)
            with self._lock:
                self.answers.append((time.monotonic(), answer))
            if self.pause:
                self._stop.wait(self.pause)

    def __enter__(self) -> ClientLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def failures(self) -> list[Answer]:
        with self._lock:
            return [answer for _, answer in self.answers if answer.status != 200]

    def count(self) -> int:
        with self._lock:
            return len(self.answers)


def run_client_pod(stack: Stack, namespace: str, script: str, timeout: float = 120, memory: str = "256Mi") -> str:
    """Run `python -c script` in a restricted pod of the runtime image, as Ray's pods run it (read-only root,
    the image's writable paths on emptyDirs); its output (it must succeed)."""
    node = stack.node
    name = f"client-{uuid.uuid4().hex[:6]}"
    restricted = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "client",
                    "image": stack.runtime_image,
                    "command": ["python", "-c", script],
                    "securityContext": restricted,
                    "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": memory}},
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}],
        },
    }
    stack.apply(pod, namespace=namespace)

    def finished() -> str | None:
        body = get(node, "pod", name, namespace)
        phase = ((body or {}).get("status") or {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    try:
        phase = wait_for(
            finished, timeout=timeout, what=f"client pod {name}", diagnose=lambda: describe(node, namespace)
        )
        output = node.kubectl("logs", "-n", namespace, name).stdout
        assert phase == "Succeeded", f"client pod {phase}: {output}"
        return output
    finally:
        node.kubectl("delete", "pod", "-n", namespace, name, "--wait=false", "--grace-period=0")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
