"""Where each kind lives in the API, as the API server says (its discovery documents), cached.

The server lists the resources of each group version (`/api/v1`, `/apis/<group>/<version>`):
each kind's plural, the path segment its objects are under. A kind that is not in the cached
list is looked up once more before it is refused, since a CRD (KubeRay's) may be installed
after the operator started.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

# Fetches a group version's APIResourceList; None when the server does not serve the group version.
FetchResources = Callable[[str], Mapping[str, Any] | None]


class UnservedKindError(LookupError):
    """The API server does not serve this kind (its CRD is not installed, or the version is wrong)."""

    def __init__(self, api_version: str, kind: str) -> None:
        self.api_version, self.kind = api_version, kind
        super().__init__(f"the API server does not serve kind {kind} of apiVersion {api_version}")


def group_version_path(api_version: str) -> str:
    """The discovery path of a group version: the core group is under /api, every other under /apis."""
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


class Discovery:
    """kind → plural per group version, read from the server when first needed; safe to share between threads."""

    def __init__(self, fetch: FetchResources) -> None:
        self._fetch = fetch
        self._plurals: dict[str, dict[str, str]] = {}  # apiVersion → kind → plural
        self._lock = threading.Lock()

    def plural(self, api_version: str, kind: str) -> str:
        """The plural of `kind`; raises UnservedKindError when the server does not serve it, even when asked again."""
        with self._lock:
            plural = self._plurals.get(api_version, {}).get(kind)
        if plural is not None:
            return plural
        plurals = self._refresh(api_version)  # not known yet, or installed since it was read
        if kind not in plurals:
            raise UnservedKindError(api_version, kind)
        return plurals[kind]

    def _refresh(self, api_version: str) -> dict[str, str]:
        document = self._fetch(api_version) or {}
        plurals = {
            str(resource["kind"]): str(resource["name"])
            for resource in document.get("resources") or ()
            if "/" not in str(resource.get("name", "/"))  # subresources (status, scale) are not kinds
        }
        with self._lock:
            self._plurals[api_version] = plurals
        return plurals
