"""The one module that talks to the Kubernetes API server.

A thin JSON layer over urllib3: objects are plain dicts
(manifests), so builders stay pure and nothing here knows about kubetune's kinds
beyond where each kind lives in the API.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubetune.operator.kubeconfig import Connection, connect

Manifest = dict[str, Any]
FIELD_MANAGER = "kubetune"
REQUEST_TIMEOUT = urllib3.Timeout(connect=10.0, read=60.0)

# (apiVersion, kind) → plural: every kind the operator reads or writes.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Event"): "events",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("ray.io/v1", "RayJob"): "rayjobs",
    ("ray.io/v1", "RayService"): "rayservices",
    ("kubetune.io/v1alpha1", "FineTuneJob"): "finetunejobs",
    ("kubetune.io/v1alpha1", "ModelDeployment"): "modeldeployments",
}


class ApiError(Exception):
    """An API server answer other than success, with its HTTP status and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"{status} {reason}: {message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    plural = PLURALS[(api_version, kind)]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"


def object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(api_version, kind, namespace)}/{name}"


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> ObjectRef:
        meta = manifest["metadata"]
        return cls(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])

    @property
    def path(self) -> str:
        return object_path(self.api_version, self.kind, self.namespace, self.name)


class Kube:
    """Blocking calls to the API server; safe to share between threads."""

    # A token file (a pod's projected token) is re-read this often, not on every request.
    TOKEN_FILE_SECONDS = 60.0

    # Enough connections for the handler threads working at once.
    POOL_SIZE = 32

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._pool = self._new_pool(connection)
        self._token: tuple[str | None, float] = (None, -self.TOKEN_FILE_SECONDS)

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
        return cls(connect(kubeconfig))

    @property
    def connection(self) -> Connection:
        return self._current()[0]

    def _current(self) -> tuple[Connection, urllib3.PoolManager, dict[str, str]]:
        """The connection, its pool and its auth headers, renewing plugin credentials when due."""
        with self._lock:
            fresh = self._connection.fresh()
            if fresh is not self._connection:  # renewed plugin credentials: new certificates, maybe
                self._connection, self._pool = fresh, self._new_pool(fresh)
                self._token = (None, -self.TOKEN_FILE_SECONDS)
            connection, pool = self._connection, self._pool
            token, read_at = self._token
            if time.monotonic() - read_at >= self.TOKEN_FILE_SECONDS:
                token = connection.bearer_token()
                self._token = (token, time.monotonic() if connection.token_file else float("inf"))
        if token:
            return connection, pool, {"Authorization": f"Bearer {token}"}
        if connection.username is not None:
            return (
                connection,
                pool,
                urllib3.util.make_headers(basic_auth=f"{connection.username}:{connection.password or ''}"),
            )
        return connection, pool, {}

    def _new_pool(self, connection: Connection) -> urllib3.PoolManager:
        context = ssl.create_default_context(cafile=connection.ca_file)
        if connection.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if connection.cert_file and connection.key_file:
            context.load_cert_chain(connection.cert_file, connection.key_file)
        return urllib3.PoolManager(num_pools=4, maxsize=self.POOL_SIZE, block=False, ssl_context=context)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Manifest:
        connection, pool, auth = self._current()
        url = f"{connection.server}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        try:
            response = pool.request(
                method,
                url,
                body=None if body is None else json.dumps(body).encode(),
                headers={**_headers(content_type), **auth},
                timeout=REQUEST_TIMEOUT,
                retries=False,
            )
        except urllib3.exceptions.HTTPError as error:
            raise ApiError(0, "Unreachable", f"{method} {path}: {error}") from None
        if response.status >= 400:
            raise _api_error(response.status, response.data)
        return json.loads(response.data) if response.data else {}

    def watch(
        self, api_version: str, kind: str, namespace: str | None, timeout_seconds: int = 300
    ) -> Iterator[tuple[str, Manifest]]:
        """Stream (type, object) events of a kind, from now on, until the server ends the watch."""
        connection, pool, auth = self._current()
        query = urllib.parse.urlencode({"watch": "true", "timeoutSeconds": str(timeout_seconds)})
        url = f"{connection.server}{collection_path(api_version, kind, namespace)}?{query}"
        headers = {**_headers("application/json"), **auth}
        response = pool.request("GET", url, headers=headers, preload_content=False, retries=False, timeout=None)
        try:
            if response.status >= 400:
                raise _api_error(response.status, response.read())
            buffer = b""
            for chunk in response.stream(64 * 1024):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        event = json.loads(line)
                        yield event["type"], event["object"]
        finally:
            response.release_conn()

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        try:
            return self.request("GET", object_path(api_version, kind, namespace, name))
        except ApiError as error:
            if error.not_found:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None, labels: Mapping[str, str]) -> list[Manifest]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        items: list[Manifest] = self.request(
            "GET", collection_path(api_version, kind, namespace), query={"labelSelector": selector}
        ).get("items", [])
        return items

    def create(self, manifest: Manifest) -> Manifest | None:
        """Create the object and return it; None when it already exists (creation is idempotent by name)."""
        ref = ObjectRef.of(manifest)
        try:
            return self.request("POST", collection_path(ref.api_version, ref.kind, ref.namespace), body=manifest)
        except ApiError as error:
            if error.conflict and error.reason == "AlreadyExists":
                return None
            raise

    def delete(self, ref: ObjectRef) -> bool:
        """Delete in the background (dependents are collected); False when it was already gone."""
        try:
            self.request("DELETE", ref.path, body={"propagationPolicy": "Background"})
        except ApiError as error:
            if error.not_found:
                return False
            raise
        return True

    def patch_status(self, ref: ObjectRef, status: Manifest, resource_version: str | None = None) -> Manifest:
        """Merge-patch the status subresource; with a resourceVersion, fail on a concurrent change."""
        body: Manifest = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self.request("PATCH", f"{ref.path}/status", body=body, content_type="application/merge-patch+json")

    def patch(self, ref: ObjectRef, body: Manifest) -> Manifest:
        return self.request("PATCH", ref.path, body=body, content_type="application/merge-patch+json")

    def event(self, involved: Mapping[str, Any], kind: str, reason: str, message: str, now: datetime) -> None:
        """Record a core/v1 Event on an object (what `kubectl describe` lists)."""
        meta = involved["metadata"]
        stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.request(
            "POST",
            collection_path("v1", "Event", meta["namespace"]),
            body={
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {
                    "apiVersion": involved["apiVersion"],
                    "kind": involved["kind"],
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta.get("uid"),
                },
                "type": kind,
                "reason": reason,
                "message": message[:1024],
                "source": {"component": FIELD_MANAGER},
                "reportingComponent": FIELD_MANAGER,
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
            },
        )


def _headers(content_type: str) -> dict[str, str]:
    return {"Accept": "application/json", "Content-Type": content_type, "User-Agent": FIELD_MANAGER}


def _api_error(status: int, data: bytes) -> ApiError:
    reason, message = "", data.decode(errors="replace")
    try:
        payload = json.loads(data)
        reason, message = payload.get("reason", reason), payload.get("message", message)
    except (ValueError, TypeError, AttributeError):
        pass
    return ApiError(status, str(reason), str(message))
