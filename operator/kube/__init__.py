"""The one way to the Kubernetes API server (this package): `Kube`.

Where the server is and who we are come from the `kubernetes` package's configuration
loading: the pod's service account (its projected token re-read as it rotates), or
the kubeconfig with every `KUBECONFIG` path merged, exec credential plugins and OIDC.
Requests go through `transport`, a thin layer over the standard library's HTTP client
fed by that configuration (`bench/kube_client.py` measures it against urllib3 and the
package's ApiClient): objects are plain dicts (manifests), so builders stay pure. Where
each kind lives in the API comes from the server's discovery documents (`discovery`).
Nothing else in the operator sends requests to the API server (kopf's own login and CRD
watches aside), and nothing else reaches `transport`.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kubernetes.client
import kubernetes.config
from kubetune.operator.kube.discovery import Discovery, UnservedKindError, group_version_path
from kubetune.operator.kube.transport import TRANSPORT_ERRORS, Connections, Endpoint
from kubetune.operator.kube.transport import Stream as Stream  # a watch another thread may end (`interrupt`)

Manifest = dict[str, Any]
# A watch ends with one of these when it is cut off, or when what comes is not a watch stream.
WATCH_ERRORS: tuple[type[Exception], ...] = (*TRANSPORT_ERRORS, ValueError)
FIELD_MANAGER = "kubetune"
REQUEST_TIMEOUT = 60.0  # seconds a request may take to connect, and then between bytes of its answer
WATCH_GRACE_SECONDS = 30
# Longest message an Event carries (the API server allows 1 KiB more; the rest is noise).
EVENT_MESSAGE_MAX_LENGTH = 1024
# Objects as PartialObjectMetadata: names, labels and owners, never a Secret's data.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
# Objects per list request (client-go's default): a large collection comes in pages, never in one answer.
LIST_PAGE_SIZE = 500


class ApiError(Exception):
    """An API server answer other than success, with its HTTP status and message.

    `retry_after` is the server's Retry-After (seconds) on 429 and some 5xx answers.
    Status 0 means the server could not be reached.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        retry_after: float | None = None,
        causes: tuple[str, ...] = (),
    ) -> None:
        self.status, self.reason, self.message, self.retry_after = status, reason, message, retry_after
        self.causes = causes  # the reasons of the Status's details.causes
        super().__init__(f"{status} {reason}: {message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def namespace_terminating(self) -> bool:
        """Refused because the namespace is being deleted: its objects are about to go too."""
        return self.status == 403 and "NamespaceTerminating" in self.causes

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def throttled(self) -> bool:
        return self.status == 429

    @property
    def expired(self) -> bool:
        """A watch or list resourceVersion too old to continue from: list again."""
        return self.status == 410


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


def load_configuration(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    """The pod's service account when running in a pod, else the kubeconfig.

    The kubeconfig is `kubeconfig`, else every path in KUBECONFIG (merged as kubectl
    does), else ~/.kube/config.
    """
    configuration = kubernetes.client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration, try_refresh_token=True
        )
    else:
        # Read KUBECONFIG now: the package reads it once, when it is imported.
        path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=configuration, persist_config=False
        )
    return configuration


class Kube:
    """Blocking calls to the API server; safe to share between threads."""

    # Enough connections for the reconcile threads working at once.
    POOL_SIZE = 32

    def __init__(self, configuration: kubernetes.client.Configuration) -> None:
        self.configuration = configuration
        self._lock = threading.Lock()
        self._connections: Connections | None = None
        self.discovery = Discovery(self._resources)

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig (see `load_configuration`)."""
        return cls(load_configuration(kubeconfig))

    @property
    def server(self) -> str:
        return str(self.configuration.host)

    def authorization(self) -> str | None:
        """The Authorization header to send now (the package renews expiring credentials here)."""
        with self._lock:
            value = self.configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        return str(value) if value else None

    def collection_path(self, api_version: str, kind: str, namespace: str | None) -> str:
        """Where the objects of a kind are (in `namespace`, or in all namespaces).

        Raises ApiError 404 naming the kind when the server does not serve it (its CRD is not installed).
        """
        try:
            plural = self.discovery.plural(api_version, kind)
        except UnservedKindError as error:
            raise ApiError(404, "NotFound", str(error)) from None
        base = group_version_path(api_version)
        return f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"

    def object_path(self, ref: ObjectRef) -> str:
        return f"{self.collection_path(ref.api_version, ref.kind, ref.namespace)}/{ref.name}"

    def _resources(self, api_version: str) -> Manifest | None:
        """The server's APIResourceList of a group version; None when it does not serve the group version."""
        try:
            return self.request("GET", group_version_path(api_version))
        except ApiError as error:
            if error.not_found:
                return None
            raise

    def _connection(self) -> tuple[Connections, dict[str, str]]:
        """The connections to use now and the auth headers (both renewed with the credentials)."""
        authorization = self.authorization()
        config = self.configuration
        endpoint = Endpoint(
            self.server, config.ssl_ca_cert, config.cert_file, config.key_file, bool(config.verify_ssl),
            config.tls_server_name, config.proxy,
        )  # fmt: skip
        with self._lock:
            stale = self._connections if self._connections and self._connections.endpoint != endpoint else None
            if self._connections is None or stale is not None:  # new certificates from a credential plugin
                self._connections = Connections(endpoint, self.POOL_SIZE, REQUEST_TIMEOUT)
            connections = self._connections
        if stale is not None:
            stale.close()
        return connections, ({"Authorization": authorization} if authorization else {})

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> Manifest:
        connections, auth = self._connection()
        if query:
            path += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        try:
            response = connections.request(method, path, data, {**_headers(content_type, accept), **auth})
        except TRANSPORT_ERRORS as error:
            raise ApiError(0, "Unreachable", f"{method} {path}: {error}") from None
        if response.status >= 400:
            raise _api_error(response.status, response.data, response.headers.get("Retry-After"))
        return json.loads(response.data) if response.data else {}

    def watch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        timeout_seconds: int = 300,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        metadata_only: bool = False,
        streams: list[Stream] | None = None,
    ) -> Iterator[tuple[str, Manifest]]:
        """Stream (type, object) events of a kind until the server ends the watch.

        From `resource_version` when given (bookmarks included), else from now on.
        An expired version raises ApiError 410. `streams`, when given, receives the open
        stream, so that another thread may end the watch with `interrupt()`.
        """
        connections, auth = self._connection()
        query = {"watch": "true", "timeoutSeconds": str(timeout_seconds)}
        if resource_version is not None:
            query |= {"resourceVersion": resource_version, "allowWatchBookmarks": "true"}
        if label_selector:
            query["labelSelector"] = label_selector
        path = f"{self.collection_path(api_version, kind, namespace)}?{urllib.parse.urlencode(query)}"
        headers = {**_headers("application/json", METADATA_ONLY if metadata_only else "application/json"), **auth}
        try:  # a silent connection is given up a while after the server should have ended the watch
            stream = connections.stream("GET", path, headers, read_timeout=timeout_seconds + WATCH_GRACE_SECONDS)
        except TRANSPORT_ERRORS as error:
            raise ApiError(0, "Unreachable", f"watch {kind}: {error}") from None
        if streams is not None:
            streams.append(stream)
        response = stream.response
        try:
            if response.status >= 400:
                raise _api_error(response.status, response.read(), response.headers.get("Retry-After"))
            buffer = b""
            while chunk := stream.read():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            status = event["object"]
                            code, reason = int(status.get("code", 0)), status.get("reason", "")
                            raise ApiError(code, reason, status.get("message", ""))
                        yield event["type"], event["object"]
        except WATCH_ERRORS as error:  # cut off, or not a watch stream
            raise ApiError(0, "Unreachable", f"watch {kind}: {error!r}") from None
        finally:
            stream.close()

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        try:
            return self.request("GET", self.object_path(ObjectRef(api_version, kind, namespace, name)))
        except ApiError as error:
            if error.not_found:
                return None
            raise

    def list_with_version(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        metadata_only: bool = False,
        page_size: int = LIST_PAGE_SIZE,
    ) -> tuple[list[Manifest], str]:
        """The objects and the list's resourceVersion (where a watch continues from), read page by page."""
        items: list[Manifest] = []
        version = ""
        pages = self.list_pages(
            api_version,
            kind,
            namespace,
            label_selector=label_selector,
            field_selector=field_selector,
            metadata_only=metadata_only,
            page_size=page_size,
        )
        for page, page_version in pages:
            items += page
            version = page_version
        return items, version

    def list_pages(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        metadata_only: bool = False,
        page_size: int = LIST_PAGE_SIZE,
    ) -> Iterator[tuple[list[Manifest], str]]:
        """The objects, at most `page_size` per request (`limit`/`continue`), each page with the list's version.

        Every page comes from the same snapshot, so the version is the list's. A continue token
        that has expired (the snapshot is compacted away) raises ApiError 410: list again.
        """
        query = {"limit": str(page_size)} | ({"labelSelector": label_selector} if label_selector else {})
        if field_selector:
            query["fieldSelector"] = field_selector
        while True:
            answer = self.request(
                "GET",
                self.collection_path(api_version, kind, namespace),
                query=query,
                accept=METADATA_LIST if metadata_only else "application/json",
            )
            meta = answer.get("metadata") or {}
            yield answer.pop("items", None) or [], str(meta.get("resourceVersion", ""))
            if not meta.get("continue"):
                return
            query["continue"] = str(meta["continue"])

    def list(self, api_version: str, kind: str, namespace: str | None, labels: Mapping[str, str]) -> list[Manifest]:
        items, _ = self.list_with_version(api_version, kind, namespace, label_selector=selector(labels))
        return items

    def create(self, manifest: Manifest) -> Manifest | None:
        """Create the object and return it; None when it already exists (creation is idempotent by name)."""
        ref = ObjectRef.of(manifest)
        try:
            return self.request("POST", self.collection_path(ref.api_version, ref.kind, ref.namespace), body=manifest)
        except ApiError as error:
            if error.conflict and error.reason == "AlreadyExists":
                return None
            raise

    def delete(self, ref: ObjectRef, uid: str | None = None) -> bool:
        """Delete in the background (dependents are collected); False when it was already gone.

        With `uid`, only that object: not one made since under the same name (a 409 Conflict then).
        """
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", self.object_path(ref), body=body)
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
        path = f"{self.object_path(ref)}/status"
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def patch(self, ref: ObjectRef, body: Manifest) -> Manifest:
        return self.request("PATCH", self.object_path(ref), body=body, content_type="application/merge-patch+json")

    def event(self, involved: Mapping[str, Any], kind: str, reason: str, message: str, now: datetime) -> None:
        """Record a core/v1 Event on an object (what `kubectl describe` lists)."""
        meta = involved["metadata"]
        stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.request(
            "POST",
            self.collection_path("v1", "Event", meta["namespace"]),
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
                "message": message[:EVENT_MESSAGE_MAX_LENGTH],
                "source": {"component": FIELD_MANAGER},
                "reportingComponent": FIELD_MANAGER,
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
            },
        )


def selector(labels: Mapping[str, str]) -> str:
    """A label selector requiring each label to have its value (an empty value: the label exists)."""
    return ",".join(f"{key}={value}" if value else key for key, value in labels.items())


def _headers(content_type: str, accept: str) -> dict[str, str]:
    return {"Accept": accept, "Content-Type": content_type, "User-Agent": FIELD_MANAGER}


def _api_error(status: int, data: bytes, retry_after: str | None = None) -> ApiError:
    reason, message = "", data.decode(errors="replace")
    causes: tuple[str, ...] = ()
    try:
        payload = json.loads(data)
        reason, message = payload.get("reason", reason), payload.get("message", message)
        causes = tuple(str(cause.get("reason", "")) for cause in (payload.get("details") or {}).get("causes") or ())
    except (ValueError, TypeError, AttributeError):
        pass
    return ApiError(status, str(reason), str(message), _seconds(retry_after), causes)


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After in seconds (the API server sends whole seconds; an HTTP date is not used by it)."""
    try:
        return max(0.0, float(retry_after)) if retry_after else None
    except ValueError:
        return None
