"""The one module that talks to the Kubernetes API server.

A thin JSON layer over the official client's transport: objects are plain dicts
(manifests), so builders stay pure and nothing here knows about kubetune's kinds
beyond where each kind lives in the API.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

Manifest = dict[str, Any]
FIELD_MANAGER = "kubetune"

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


def connection(kubeconfig: str | None = None) -> client.Configuration:
    """Where the API server is and how to authenticate: in-cluster, else the kubeconfig.

    KUBECONFIG is read now, not when the client library was imported.
    """
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
        config.load_kube_config(config_file=path, client_configuration=configuration)
    return configuration


class Kube:
    """Blocking calls to the API server; safe to share between threads."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._api = api_client

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
        configuration = connection(kubeconfig)
        # Enough connections for the handler threads working at once.
        configuration.connection_pool_maxsize = 32
        return cls(client.ApiClient(configuration))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Manifest:
        try:
            response = self._api.call_api(
                path,
                method,
                query_params=list((query or {}).items()),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
            )
        except ApiException as error:
            raise _api_error(error) from None
        data = response.data
        return json.loads(data) if data else {}

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


def _api_error(error: ApiException) -> ApiError:
    reason, message = str(error.reason or ""), str(error.body or "")
    try:
        payload = json.loads(error.body or "")
        reason, message = payload.get("reason", reason), payload.get("message", message)
    except (ValueError, TypeError, AttributeError):
        pass
    return ApiError(int(error.status or 0), reason, message)
