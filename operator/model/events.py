"""Events to post, problems that stop an object, and the clock: shared by every kind. Pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kubetune.operator.conditions import Reason

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The process clock; reconcilers take a Clock so that tests inject their own."""
    return datetime.now(UTC)


def parse_time(value: str | None) -> datetime | None:
    """A Kubernetes timestamp (RFC 3339, `Z` for UTC); None for none."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


@dataclass(frozen=True)
class Event:
    """A Kubernetes event to post on the object."""

    type: str  # Normal or Warning
    reason: Reason
    message: str


@dataclass(frozen=True)
class Problem:
    """Why the object cannot be handled as asked (an invalid spec, a missing Secret), with the field named."""

    reason: Reason
    message: str
