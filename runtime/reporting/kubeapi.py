"""The one call a run makes to the Kubernetes API: merge-patch its report ConfigMap.

Standard library only (no client library in the training image): the pod's service
account token and CA, or an explicit server and token (tests, out-of-cluster runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeApiError(Exception):
    """The API server refused a request; the message has its status and reason."""


class ConfigMapPatcher:
    """Merge-patches ConfigMaps with a bearer token (what `ConfigMapReporter` writes through)."""

    def __init__(self, server: str, token: str | Path, ca_file: str | None = None, timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self._token = token
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=ca_file)
        # Straight to the API server, whatever proxy the environment names.
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self.context)
        )

    @classmethod
    def in_cluster(cls) -> ConfigMapPatcher:
        """The pod's service account (KUBERNETES_SERVICE_HOST and the mounted token and CA)."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if not host:
            raise KubeApiError("not in a Kubernetes pod: KUBERNETES_SERVICE_HOST is not set")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", SERVICE_ACCOUNT_DIR / "token", str(SERVICE_ACCOUNT_DIR / "ca.crt"))

    def token(self) -> str:
        # A projected token rotates: read the file each time.
        return self._token.read_text().strip() if isinstance(self._token, Path) else self._token

    def patch_namespaced_config_map(self, name: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.server}/api/v1/namespaces/{namespace}/configmaps/{name}",
            data=json.dumps(body).encode(),
            method="PATCH",
            headers={
                "Authorization": f"Bearer {self.token()}",
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
            },
        )
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                result: dict[str, Any] = json.loads(response.read())
                return result
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            with contextlib.suppress(ValueError):
                detail = json.loads(detail).get("message", detail)
            raise KubeApiError(f"PATCH configmap {namespace}/{name}: {error.code} {detail}") from None
        except (urllib.error.URLError, OSError) as error:
            raise KubeApiError(f"PATCH configmap {namespace}/{name}: {error}") from None
