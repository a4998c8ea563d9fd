"""Errors of a run, split by whether retrying could ever help.

`InvalidRunError` (and its subclasses) means the spec or the data can never work as
given; the entry point exits with status 2 and the message names the field or URI.
`UnavailableError` means something the run needs could not be reached (a model hub, storage):
a failure of the run (exit status 1) that says what to retry against. Anything else
is a failure of the run itself (exit status 1) too. One raised in a Ray task, actor or
Ray Train worker reaches the driver wrapped by Ray; `invalid_run_cause` and
`unavailable_cause` find it there.
"""

from __future__ import annotations

from typing import TypeVar

from kubetune.runtime.contract.report import Unavailable

_Found = TypeVar("_Found", bound=BaseException)


class InvalidRunError(ValueError):
    """The spec, the data or the machine cannot support this run; retrying will not help."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[type[InvalidRunError], tuple[str, str]]:
        # Raised in a Ray worker, it crosses to the driver by pickling.
        return (type(self), (self.where, self.problem))


class DataError(InvalidRunError):
    """Training, validation or test data that cannot be used; `where` names the field or URI."""


class ModelError(InvalidRunError):
    """A base model that cannot be loaded or adapted as the spec asks."""


class StorageError(InvalidRunError):
    """A URI that cannot be read from or written to."""


class UnavailableError(RuntimeError):
    """Something the run needs could not be reached now (`what`); trying again later may help.

    `where` names the spec field whose value needs it (e.g. model.uri); the message says what was
    tried and what to do.
    """

    def __init__(self, what: Unavailable, where: str, problem: str) -> None:
        self.what = what
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[type[UnavailableError], tuple[Unavailable, str, str]]:
        return (type(self), (self.what, self.where, self.problem))


class ModelUnavailableError(UnavailableError):
    """An hf:// model that the hub (or its mirror) cannot deliver now, or that offline mode finds in no cache."""


class DatasetUnavailableError(UnavailableError):
    """An hf://datasets/ dataset that the hub (or its mirror) cannot deliver now, or that offline mode finds in no
    cache."""


class StorageUnavailableError(UnavailableError):
    """Object storage that does not answer now (no connection, a timeout, a server error or throttling)."""


def invalid_run_cause(error: BaseException) -> InvalidRunError | None:
    """The InvalidRunError behind an error Ray raised for a task, an actor or a Ray Train run, if any.

    Ray wraps what a worker raised (`RayTaskError.cause`; Ray Train's `ControllerError.controller_failure`
    and `WorkerGroupError.worker_failures`), so an invalid run found on a worker still exits as invalid.
    """
    return _cause(error, InvalidRunError)


def unavailable_cause(error: BaseException) -> UnavailableError | None:
    """The UnavailableError behind an error (wrapped by Ray as `invalid_run_cause` describes), if any."""
    return _cause(error, UnavailableError)


def _cause(error: BaseException, kind: type[_Found]) -> _Found | None:
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        wrapped = getattr(current, "cause", None)
        # A RayTaskError re-raised "as an instance of" its cause is both; its cause carries the fields.
        if isinstance(current, kind) and not isinstance(wrapped, BaseException):
            return current
        failures = getattr(current, "worker_failures", None)
        inner = [wrapped, getattr(current, "controller_failure", None), current.__cause__]
        inner += list(failures.values()) if isinstance(failures, dict) else []
        pending += [item for item in inner if isinstance(item, BaseException)]
    return None
