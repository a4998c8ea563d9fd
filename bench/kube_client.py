"""Which request layer the operator uses: its thin http.client layer against urllib3 and the package's ApiClient.

    python bench/kube_client.py [--rounds 7] [--cycles 150]

Both take their server and credentials from the same `kubernetes.client.Configuration`
(the package's kubeconfig loading) and talk to the test control plane. One cycle is
what a reconcile does to an object, on a ConfigMap with a RayJob-sized payload:
create, get, merge-patch, delete. Each side runs `--cycles` cycles per round; the
rounds alternate between the sides (interleaved), and the table gives the median
and spread of this process's CPU time per cycle (the cost the operator pays; the
API server's work is the same for both) and of the wall time per cycle.

- thin: `kubetune.operator.kube.Kube` (dicts in, dicts out) over http.client;
- urllib3: the same JSON layer over a urllib3 connection pool (what the operator used before);
- ApiClient (dicts): the package's `ApiClient.call_api` through `CustomObjectsApi`-style
  generic calls, answers parsed to dicts, which is what the operator needs;
- ApiClient (models): `CoreV1Api` with its typed models, the package's usual way.

The ratio is each side's CPU per cycle over the thin layer's (above 1: thin is cheaper).
"""

from __future__ import annotations

import argparse
import json
import resource
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO_ROOT))  # appended: the repository root must never shadow the standard library

import kubernetes.client  # noqa: E402
import urllib3  # noqa: E402
from kubetune.operator.kube import Kube, ObjectRef, load_configuration  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.controlplane import ControlPlane  # noqa: E402

NAMESPACE = "bench-client"
# About the size of a run's RayJob manifest.
PAYLOAD = {"config.json": "x" * 4000}
Cycle = Callable[[str], None]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app.kubernetes.io/managed-by": "kubetune"}},
        "data": PAYLOAD,
    }


def thin_cycle(kube: Kube) -> Cycle:
    def cycle(name: str) -> None:
        kube.create(manifest(name))
        kube.get("v1", "ConfigMap", NAMESPACE, name)
        kube.patch(ObjectRef("v1", "ConfigMap", NAMESPACE, name), {"metadata": {"labels": {"step": "patched"}}})
        kube.delete(ObjectRef("v1", "ConfigMap", NAMESPACE, name))

    return cycle


Call = Callable[..., Any]  # (method, path, body=None, content_type="application/json") -> the answer


def generic_cycle(call: Call) -> Cycle:
    """The cycle as generic calls on the ConfigMaps' path."""
    path = f"/api/v1/namespaces/{NAMESPACE}/configmaps"

    def cycle(name: str) -> None:
        call("POST", path, manifest(name))
        call("GET", f"{path}/{name}")
        call("PATCH", f"{path}/{name}", {"metadata": {"labels": {"step": "patched"}}}, "application/merge-patch+json")
        call("DELETE", f"{path}/{name}", {"propagationPolicy": "Background"})

    return cycle


def urllib3_cycle(configuration: kubernetes.client.Configuration) -> Cycle:
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    assert configuration.cert_file is not None and configuration.key_file is not None
    context.load_cert_chain(configuration.cert_file, configuration.key_file)
    pool = urllib3.PoolManager(maxsize=4, ssl_context=context).connection_from_url(configuration.host)

    def call(method: str, url: str, body: Any = None, content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type, "User-Agent": "kubetune"}
        data = None if body is None else json.dumps(body).encode()
        response = pool.urlopen(method, url, body=data, headers=headers, retries=False, timeout=60.0)
        if response.status >= 400:
            raise RuntimeError(f"{method} {url}: {response.status}")
        return json.loads(response.data)

    return generic_cycle(call)


def dict_cycle(client: kubernetes.client.ApiClient) -> Cycle:
    """The generic calls CustomObjectsApi makes, on the core API path, answers as dicts."""

    def call(method: str, resource_path: str, body: Any = None, content_type: str = "application/json") -> Any:
        request = client.param_serialize(
            method=method,
            resource_path=resource_path,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = client.call_api(*request)
        response.read()  # type: ignore[no-untyped-call]
        return client.response_deserialize(response, {"200": "object", "201": "object"}).data

    return generic_cycle(call)


def model_cycle(client: kubernetes.client.ApiClient) -> Cycle:
    api = kubernetes.client.CoreV1Api(client)

    def cycle(name: str) -> None:
        api.create_namespaced_config_map(NAMESPACE, manifest(name))  # type: ignore[arg-type]  # dicts serialize too
        api.read_namespaced_config_map(name, NAMESPACE)
        api.patch_namespaced_config_map(name, NAMESPACE, {"metadata": {"labels": {"step": "patched"}}})
        api.delete_namespaced_config_map(name, NAMESPACE, propagation_policy="Background")

    return cycle


def measure(cycle: Cycle, label: str, cycles: int, offset: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per cycle over `cycles` cycles."""
    cpu, wall = cpu_seconds(), time.perf_counter()
    for index in range(cycles):
        cycle(f"{label}-{offset + index}")
    return (cpu_seconds() - cpu) / cycles, (time.perf_counter() - wall) / cycles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per side")
    parser.add_argument("--cycles", type=int, default=150, help="create/get/patch/delete cycles per round")
    args = parser.parse_args()
    console = Console()
    with ControlPlane(controllers=False) as plane:
        configuration = load_configuration(str(plane.kubeconfig))
        kube = Kube(configuration)
        kube.request(
            "POST",
            "/api/v1/namespaces",
            body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        )
        client = kubernetes.client.ApiClient(configuration)
        sides = {
            "thin (http.client)": thin_cycle(kube),
            "urllib3": urllib3_cycle(configuration),
            "ApiClient (dicts)": dict_cycle(client),
            "ApiClient (models)": model_cycle(client),
        }
        for name, cycle in sides.items():  # warm up: connections, imports, caches
            measure(cycle, f"warm{len(name)}", 10, 0)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for round_ in range(args.rounds):
            for index, (name, cycle) in enumerate(sides.items()):
                results[name].append(measure(cycle, f"s{index}", args.cycles, round_ * args.cycles))
            console.print(f"round {round_ + 1}/{args.rounds} done")
    thin_cpu = statistics.median(cpu for cpu, _ in results["thin (http.client)"])
    table = Table(title=f"One create/get/patch/delete cycle ({args.rounds} rounds x {args.cycles} cycles, interleaved)")
    for column in ("request layer", "client CPU ms (median)", "spread", "wall ms (median)", "CPU ratio to thin"):
        table.add_column(column, justify="right")
    for name, samples in results.items():
        cpu = [c * 1000 for c, _ in samples]
        wall = [w * 1000 for _, w in samples]
        table.add_row(
            name,
            f"{statistics.median(cpu):.2f}",
            f"{min(cpu):.2f}-{max(cpu):.2f}",
            f"{statistics.median(wall):.2f}",
            f"{statistics.median(cpu) / (thin_cpu * 1000):.2f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
