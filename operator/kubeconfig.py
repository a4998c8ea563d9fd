"""Where the API server is and who we are: in-cluster service account, or a kubeconfig file.

A small reader of what kubectl reads (current context; CA, client certificate and
key as files or data; bearer token or token file; basic auth; `exec` credential
plugins such as those of EKS and GKE), so the operator needs no client library:
kopf brings its own HTTP client, and ours is urllib3.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(Exception):
    """No usable credentials: the message says what is missing."""


@dataclass(frozen=True)
class Connection:
    """One API server and the credentials to use with it."""

    server: str
    ca_file: str | None = None
    insecure: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    token_file: str | None = None
    username: str | None = None
    password: str | None = None
    namespace: str = "default"
    exec_plugin: dict[str, Any] | None = field(default=None, compare=False)
    expires: datetime | None = None

    def bearer_token(self) -> str | None:
        """The token to send now (a token file is re-read: projected tokens rotate)."""
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        return self.token

    def fresh(self, now: datetime | None = None) -> Connection:
        """This connection, with exec-plugin credentials renewed when they are about to expire."""
        if self.exec_plugin is None:
            return self
        now = now or datetime.now(UTC)
        if (self.token or self.cert_file) and (self.expires is None or self.expires - now > timedelta(seconds=60)):
            return self
        return _run_exec_plugin(self, self.exec_plugin)


def connect(kubeconfig: str | None = None) -> Connection:
    """In-cluster credentials when running in a pod, else the kubeconfig.

    The kubeconfig is `kubeconfig`, else the first path in KUBECONFIG, else ~/.kube/config.
    """
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and SERVICE_ACCOUNT_DIR.is_dir():
        return in_cluster()
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or "~/.kube/config"
    return from_kubeconfig(Path(path).expanduser())


def in_cluster() -> Connection:
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host
    namespace_file = SERVICE_ACCOUNT_DIR / "namespace"
    return Connection(
        server=f"https://{host}:{port}",
        ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        token_file=str(SERVICE_ACCOUNT_DIR / "token"),
        namespace=namespace_file.read_text().strip() if namespace_file.exists() else "default",
    )


def from_kubeconfig(path: Path) -> Connection:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {error.strerror}") from None
    contexts = {item["name"]: item.get("context") or {} for item in document.get("contexts") or []}
    name = document.get("current-context")
    if not name or name not in contexts:
        raise KubeConfigError(f"kubeconfig {path}: current-context {name!r} is not among its contexts")
    context = contexts[name]
    cluster = _named(document, "clusters", "cluster", context.get("cluster"), path)
    user = _named(document, "users", "user", context.get("user"), path) if context.get("user") else {}
    base = path.parent
    connection = Connection(
        server=cluster.get("server") or "",
        ca_file=_file(cluster, "certificate-authority", base),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        cert_file=_file(user, "client-certificate", base),
        key_file=_file(user, "client-key", base),
        token=user.get("token"),
        token_file=str(base / user["tokenFile"]) if user.get("tokenFile") else None,
        username=user.get("username"),
        password=user.get("password"),
        namespace=context.get("namespace") or "default",
        exec_plugin=user.get("exec"),
    )
    if not connection.server:
        raise KubeConfigError(f"kubeconfig {path}: cluster {context.get('cluster')!r} has no server")
    return connection.fresh()


def _named(document: dict[str, Any], section: str, key: str, name: str | None, path: Path) -> dict[str, Any]:
    for item in document.get(section) or []:
        if item.get("name") == name:
            found: dict[str, Any] = item.get(key) or {}
            return found
    raise KubeConfigError(f"kubeconfig {path}: no {key} named {name!r}")


def _file(section: dict[str, Any], key: str, base: Path) -> str | None:
    """The path of a PEM file given as `<key>` (a path) or `<key>-data` (base64, written to a private file)."""
    if section.get(f"{key}-data"):
        return _private_file(base64.b64decode(section[f"{key}-data"]))
    if section.get(key):
        return str((base / section[key]).expanduser())
    return None


def _private_file(content: bytes) -> str:
    handle, name = tempfile.mkstemp(prefix="kubetune-", suffix=".pem")
    with os.fdopen(handle, "wb") as out:
        out.write(content)
    return name


def _run_exec_plugin(connection: Connection, plugin: dict[str, Any]) -> Connection:
    """Run a client-go credential plugin and take the token or certificate it prints."""
    command = [plugin["command"], *(plugin.get("args") or [])]
    env = {**os.environ, **{item["name"]: item["value"] for item in plugin.get("env") or []}}
    env["KUBERNETES_EXEC_INFO"] = json.dumps(
        {"apiVersion": plugin.get("apiVersion"), "kind": "ExecCredential", "spec": {"interactive": False}}
    )
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=True)
        status = json.loads(done.stdout)["status"]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as error:
        raise KubeConfigError(f"credential plugin {plugin['command']!r} failed: {error}") from None
    expires = status.get("expirationTimestamp")
    return replace(
        connection,
        token=status.get("token"),
        cert_file=_private_file(status["clientCertificateData"].encode())
        if status.get("clientCertificateData")
        else None,
        key_file=_private_file(status["clientKeyData"].encode()) if status.get("clientKeyData") else None,
        expires=datetime.fromisoformat(expires.replace("Z", "+00:00")) if expires else None,
    )
