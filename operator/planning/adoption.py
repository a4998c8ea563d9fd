"""Whether an object found under a name the operator needs is the one it would create: pure, no I/O.

Creation is idempotent by name: a pass that did not finish leaves objects that the next
pass finds and adopts. A controller ownerReference carrying the owner's UID is not enough
to tell such an object from a planted one, since anyone who may create the object may
write that reference too. So an object is adopted only when its controller reference
names the owner (API group, kind, name and UID) and its content is what the operator
would create now: every field it sets has the same value (the API server's defaults and
other controllers' additions are allowed), and a ConfigMap holds exactly the data it would
hold (each key of a ConfigMap is mounted as a file).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Fields another controller may change on an object kubetune made: Kueue admits a RayJob by unsuspending it.
_CHANGED_BY_OTHERS: dict[str, frozenset[tuple[str, ...]]] = {"RayJob": frozenset({("spec", "suspend")})}
# Whole fields compared as they are (not as a subset): what a ConfigMap mounts.
_EXACT: dict[str, frozenset[str]] = {"ConfigMap": frozenset({"data", "binaryData"})}


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def _controller(manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
    references = (manifest.get("metadata") or {}).get("ownerReferences") or []
    return next((reference for reference in references if reference.get("controller")), None)


def _differences(desired: Any, existing: Any, path: tuple[str, ...], ignored: frozenset[tuple[str, ...]]) -> list[str]:
    """Where `existing` does not hold `desired`: dicts may have more keys, lists are compared item by item."""
    if path in ignored:
        return []
    where = ".".join(path)
    if isinstance(desired, Mapping):
        if not isinstance(existing, Mapping):
            return [where]
        return [
            difference
            for key, value in desired.items()
            for difference in _differences(value, existing.get(key), (*path, str(key)), ignored)
        ]
    if isinstance(desired, list):
        if not isinstance(existing, list) or len(existing) != len(desired):
            return [where]
        return [
            difference
            for index, (want, have) in enumerate(zip(desired, existing, strict=True))
            for difference in _differences(want, have, (*path, str(index)), ignored)
        ]
    return [] if desired == existing else [where]


def adoption_problem(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> str | None:
    """Why `existing` is not the object `desired` describes (None: it is, and may be adopted).

    The answer names what differs (a field path), never its value.
    """
    kind = str(desired["kind"])
    want, have = _controller(desired), _controller(existing)
    if want is not None:
        if have is None:
            return "it has no controller"
        for key in ("kind", "name", "uid"):
            if have.get(key) != want.get(key):
                return f"its controller's {key} differs"
        if _group(str(have.get("apiVersion", ""))) != _group(str(want["apiVersion"])):
            return "its controller's API group differs"
    ignored = _CHANGED_BY_OTHERS.get(kind, frozenset())
    exact = _EXACT.get(kind, frozenset())
    meta_want, meta_have = desired.get("metadata") or {}, existing.get("metadata") or {}
    differences = [
        *_differences(meta_want.get("labels") or {}, meta_have.get("labels") or {}, ("metadata", "labels"), ignored),
        *_differences(
            meta_want.get("annotations") or {}, meta_have.get("annotations") or {}, ("metadata", "annotations"), ignored
        ),
    ]
    for field, value in desired.items():
        if field in ("apiVersion", "kind", "metadata", "status"):
            continue
        if field in exact:
            differences += [] if existing.get(field) == value else [field]
        else:
            differences += _differences(value, existing.get(field), (field,), ignored)
    for field in exact - set(desired):
        differences += [field] if existing.get(field) else []
    return f"its {', '.join(differences)} differ from what kubetune would create" if differences else None
