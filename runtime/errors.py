"""Errors of a run, split by whether retrying could ever help.

`InvalidRunError` (and its subclasses) means the spec or the data can never work as
given; the entry point exits with status 2 and the message names the field or URI.
Anything else is a failure of the run itself (exit status 1). One raised in a Ray
task, actor or Ray Train worker reaches the driver wrapped by Ray; `invalid_run_cause`
finds it there.
"""

from __future__ import annotations


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


def invalid_run_cause(error: BaseException) -> InvalidRunError | None:
    """The InvalidRunError behind an error Ray raised for a task, an actor or a Ray Train run, if any.

    Ray wraps what a worker raised (`RayTaskError.cause`; Ray Train's `ControllerError.controller_failure`
    and `WorkerGroupError.worker_failures`), so an invalid run found on a worker still exits as invalid.
    """
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        wrapped = getattr(current, "cause", None)
        # A RayTaskError re-raised "as an instance of" its cause is both; its cause carries the fields.
        if isinstance(current, InvalidRunError) and not isinstance(wrapped, BaseException):
            return current
        failures = getattr(current, "worker_failures", None)
        inner = [wrapped, getattr(current, "controller_failure", None), current.__cause__]
        inner += list(failures.values()) if isinstance(failures, dict) else []
        pending += [item for item in inner if isinstance(item, BaseException)]
    return None
