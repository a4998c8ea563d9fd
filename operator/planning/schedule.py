"""When a FineTuneJob's schedule fires, in its time zone. Pure: `now` is passed in."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import CroniterError, croniter
from kubetune.operator.api.finetunejob import FineTuneJob


class ScheduleError(ValueError):
    """The job's schedule has no time to compute (a day no month has): the spec can never work."""


def _scheduled(job: FineTuneJob, now: datetime, backwards: bool) -> datetime | None:
    if not job.spec.schedule:
        return None
    zone = ZoneInfo(job.spec.time_zone or "UTC")
    try:
        schedule = croniter(job.spec.schedule, now.astimezone(zone))
        found: datetime = schedule.get_prev(datetime) if backwards else schedule.get_next(datetime)
    except CroniterError as error:
        raise ScheduleError(f"spec.schedule: {job.spec.schedule!r} never fires ({error})") from None
    return found.astimezone(UTC)


def latest_due(job: FineTuneJob, after: datetime, now: datetime) -> datetime | None:
    """The latest scheduled time in (after, now], if any."""
    previous = _scheduled(job, now, backwards=True)
    return previous if previous is not None and previous > after else None


def next_due(job: FineTuneJob, now: datetime) -> datetime | None:
    return _scheduled(job, now, backwards=False)
