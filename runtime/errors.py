"""Errors of a run, split by whether retrying could ever help.

`InvalidRunError` (and its subclasses) means the spec or the data can never work as
given; the entry point exits with status 2 and the message names the field or URI.
Anything else is a failure of the run itself (exit status 1).
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
