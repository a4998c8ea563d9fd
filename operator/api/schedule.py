"""Schedules of FineTuneJobs: cron expressions that fire, and the time zones they are read in."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime
from importlib.resources import files

from croniter import CroniterBadCronError, CroniterBadDateError, croniter
from kubetune.runtime.contract.common import cel_rule

from .common import any_case

# The IANA time zones of the pinned tzdata package: the CRD lists them, so admission knows them too.
TIME_ZONES = tuple(sorted(files("tzdata").joinpath("zones").read_text(encoding="utf-8").split()))


def check_time_zone(value: str) -> str:
    """`value` if it is a time zone of the pinned list that this machine can read, else ValueError."""
    try:
        if value not in TIME_ZONES:
            raise ValueError(value)
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None
    return value


def schedule_fires(expression: str) -> str:
    """The cron expression, if it names a time that exists (not 31 February), as the operator's croniter reads it."""
    try:
        croniter(expression, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (CroniterBadCronError, CroniterBadDateError, ValueError) as error:
        raise ValueError(f"cron schedule {expression!r} never fires ({error})") from None
    return expression


# A day of month that no month of the schedule has (31 February, 31 April): the common way to write a
# schedule that never fires. (The pydantic model checks every schedule by computing its next time.)
_FEBRUARY = f"0?2|{any_case('feb')}"
_THIRTY_DAYS = "|".join(["0?[2469]", "11", *(any_case(month) for month in ("feb", "apr", "jun", "sep", "nov"))])
_NO_SUCH_DAY = (
    f"^[^ ]+ [^ ]+ 3[01](,3[01])* ({_FEBRUARY})(,({_FEBRUARY}))* [*?]$",
    f"^[^ ]+ [^ ]+ 31(,31)* ({_THIRTY_DAYS})(,({_THIRTY_DAYS}))* [*?]$",
)
SCHEDULE_RULES = tuple(
    cel_rule(
        f"!has(self.schedule) || !self.schedule.matches('{pattern}')",
        "schedule never fires: no month it names has that day",
        ".schedule",
    )
    for pattern in _NO_SUCH_DAY
)
