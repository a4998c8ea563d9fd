"""Status writes: the merge patch that turns the status as read into the status computed."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.operator.reconcile import status_patch


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies a merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # A field the recorded spec no longer has goes, however deep it sits.
        ({"serving": {"uri": "a", "spec": {"auth": {"tokenSecret": {"name": "t"}}, "compile": False}}},
         {"serving": {"uri": "a", "spec": {"compile": False}}}),
        ({"serving": {"uri": "a", "run": 2}, "phase": "Ready"}, {"serving": {"uri": "b"}, "phase": "Ready"}),
        ({"conditions": [{"type": "Ready"}]}, {}),
        ({}, {"serving": {"uri": "a"}}),
    ],
)  # fmt: skip
def test_the_status_write_turns_the_status_read_into_the_one_computed(
    before: dict[str, Any], after: dict[str, Any]
) -> None:
    patch = status_patch(before, after)
    assert merge(before, patch) == after
    assert "phase" not in patch  # what did not change is not sent
