"""Connection and auth through the kubernetes package's config loading; the http.client layer under it; discovery."""

from __future__ import annotations

import json
import ssl
import stat
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.operator.kube import ApiError, Kube, load_configuration
from kubetune.operator.kube.transport import Connections, Endpoint


class Recorder(BaseHTTPRequestHandler):
    """Answers every request with a JSON echo of it; closes the connection after each answer when told."""

    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]] = []
    drop_after_answer = False
    status = 200
    # Discovery documents by path: the resources of each group version the server serves.
    served: dict[str, list[dict[str, Any]]] = {}

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        entry = {"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        Recorder.seen.append(entry)
        status, answer = Recorder.status, dict[str, Any](path=self.path)
        if self.path in Recorder.served:
            answer = {"kind": "APIResourceList", "resources": Recorder.served[self.path]}
        elif self.path.startswith("/apis/") and self.path.count("/") == 3:
            status, answer = 404, {"reason": "NotFound", "message": "the server could not find the requested resource"}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "7")
        self.end_headers()  # no "Connection: close": the client keeps the connection for the next request
        self.wfile.write(data)
        if Recorder.drop_after_answer:
            self.close_connection = True  # as an API server closing an idle keep-alive connection

    do_POST = do_PATCH = do_DELETE = do_GET  # noqa: N815


@pytest.fixture
def server() -> Iterator[str]:
    Recorder.seen, Recorder.drop_after_answer, Recorder.status = [], False, 200
    Recorder.served = {"/api/v1": [{"name": "configmaps", "kind": "ConfigMap", "namespaced": True}]}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def kubeconfig(path: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", **sections}))
    return path


def test_every_kubeconfig_path_is_merged(tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cluster and context in one file, the credentials in another, as kubectl merges them.
    first = kubeconfig(
        tmp_path / "cluster.yaml",
        clusters=[{"name": "lab", "cluster": {"server": server}}],
        contexts=[{"name": "lab", "context": {"cluster": "lab", "user": "ops"}}],
        **{"current-context": "lab"},
    )
    second = kubeconfig(tmp_path / "user.yaml", users=[{"name": "ops", "user": {"token": "token-from-second-file"}}])
    monkeypatch.setenv("KUBECONFIG", f"{first}:{second}")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kube = Kube.connect()
    assert kube.get("v1", "ConfigMap", "ns", "x") == {"path": "/api/v1/namespaces/ns/configmaps/x"}
    assert Recorder.seen[-1]["auth"] == "Bearer token-from-second-file"


def test_exec_plugin_credentials_are_renewed_when_they_expire(tmp_path: Path, server: str) -> None:
    plugin = tmp_path / "credentials.py"
    counter = tmp_path / "count"
    plugin.write_text(
        "import json, pathlib\n"
        f"count = pathlib.Path({str(counter)!r})\n"
        "n = int(count.read_text()) + 1 if count.exists() else 1\n"
        "count.write_text(str(n))\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',\n"
        "  'status': {'token': f'issued-{n}', 'expirationTimestamp': '2000-01-01T00:00:00Z'}}))\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    exec_user = {
        "exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "args": [str(plugin)]}
    }
    path = kubeconfig(
        tmp_path / "config",
        clusters=[{"name": "c", "cluster": {"server": server}}],
        users=[{"name": "u", "user": exec_user}],
        contexts=[{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        **{"current-context": "c"},
    )
    kube = Kube(load_configuration(str(path)))
    kube.request("GET", "/api")
    kube.request("GET", "/api")
    tokens = [entry["auth"] for entry in Recorder.seen]
    # Every token the plugin issued was already expired, so each request asked for a new one.
    assert tokens[0].startswith("Bearer issued-") and len(set(tokens)) == 2


def test_a_server_path_prefix_is_kept(tmp_path: Path, server: str) -> None:
    path = kubeconfig(
        tmp_path / "config",
        clusters=[{"name": "c", "cluster": {"server": server + "/k8s/clusters/c-1"}}],
        users=[{"name": "u", "user": {}}],
        contexts=[{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        **{"current-context": "c"},
    )
    Kube(load_configuration(str(path))).request("GET", "/version", query={"a": "b"})
    assert Recorder.seen[-1]["path"] == "/k8s/clusters/c-1/version?a=b"


def test_a_connection_closed_while_idle_is_replaced_once(server: str) -> None:
    connections = Connections(Endpoint(server))
    Recorder.drop_after_answer = True
    answers = [connections.request("POST", "/create", b"{}", {"Content-Type": "application/json"}) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 200]
    assert [entry["method"] for entry in Recorder.seen] == ["POST"] * 3  # each request reached the server once


def test_a_tls_connection_closed_while_idle_is_replaced_once(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over TLS, a request written to a connection the server closed while idle ends in an SSL EOF."""
    connections = Connections(Endpoint(server))
    connections.request("GET", "/first", None, {})
    exchange = connections._exchange
    failed: list[bool] = []

    def eof_once(*args: Any) -> Any:
        if not failed:
            failed.append(True)
            raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
        return exchange(*args)

    monkeypatch.setattr(connections, "_exchange", eof_once)
    answer = connections.request("POST", "/create", b"{}", {"Content-Type": "application/json"})
    assert answer.status == 200 and [entry["path"] for entry in Recorder.seen] == ["/first", "/create"]


def test_errors_carry_status_reason_and_retry_after(server: str) -> None:
    kube = Kube(load_configuration_for(server))
    Recorder.status = 429
    with pytest.raises(ApiError) as raised:
        kube.request("GET", "/api")
    assert (raised.value.status, raised.value.throttled, raised.value.retry_after) == (429, True, 7.0)


def test_an_unreachable_server_is_status_0() -> None:
    kube = Kube(load_configuration_for("http://127.0.0.1:9"))
    with pytest.raises(ApiError) as raised:
        kube.request("GET", "/api")
    assert raised.value.status == 0 and raised.value.reason == "Unreachable"


def load_configuration_for(server: str) -> Any:
    import kubernetes.client

    configuration = kubernetes.client.Configuration()
    configuration.host = server
    return configuration


RAY_JOBS = [
    {"name": "rayjobs", "kind": "RayJob", "namespaced": True},
    {"name": "rayjobs/status", "kind": "RayJob", "namespaced": True},
]


def test_paths_come_from_discovery_read_once(server: str) -> None:
    Recorder.served["/apis/ray.io/v1"] = RAY_JOBS
    kube = Kube(load_configuration_for(server))
    kube.get("ray.io/v1", "RayJob", "ns", "a")
    kube.get("ray.io/v1", "RayJob", "ns", "b")
    kube.get("v1", "ConfigMap", "ns", "c")
    assert [entry["path"] for entry in Recorder.seen] == [
        "/apis/ray.io/v1",
        "/apis/ray.io/v1/namespaces/ns/rayjobs/a",
        "/apis/ray.io/v1/namespaces/ns/rayjobs/b",
        "/api/v1",
        "/api/v1/namespaces/ns/configmaps/c",
    ]


def test_a_kind_installed_after_start_is_found_by_looking_again(server: str) -> None:
    kube = Kube(load_configuration_for(server))
    with pytest.raises(ApiError) as raised:  # KubeRay's CRDs are not installed yet
        kube.collection_path("ray.io/v1", "RayJob", "ns")
    assert raised.value.not_found and "RayJob" in raised.value.message and "ray.io/v1" in raised.value.message
    Recorder.served["/apis/ray.io/v1"] = RAY_JOBS
    assert kube.collection_path("ray.io/v1", "RayJob", "ns") == "/apis/ray.io/v1/namespaces/ns/rayjobs"
    assert kube.collection_path("ray.io/v1", "RayJob", None) == "/apis/ray.io/v1/rayjobs"
    assert [entry["path"] for entry in Recorder.seen] == ["/apis/ray.io/v1", "/apis/ray.io/v1"]


def test_a_kind_the_server_does_not_serve_is_refused_by_name(server: str) -> None:
    kube = Kube(load_configuration_for(server))
    kube.get("v1", "ConfigMap", "ns", "c")
    with pytest.raises(ApiError) as raised:
        kube.create({"apiVersion": "v1", "kind": "Widget", "metadata": {"namespace": "ns", "name": "w"}})
    assert raised.value.status == 404
    assert raised.value.message == "the API server does not serve kind Widget of apiVersion v1"
    # The cached group version was read again before refusing, and no object request was made.
    assert [entry["path"] for entry in Recorder.seen] == ["/api/v1", "/api/v1/namespaces/ns/configmaps/c", "/api/v1"]
