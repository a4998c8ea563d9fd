"""The controller core shared by every kind: a work queue of keys, workers, retries, metrics.

kopf handlers and the informers' change callbacks only hand keys to
`Controller.enqueue`. Workers (coroutines on kopf's event loop) take keys from the
queue once the caches are filled, and run the kind's blocking `reconcile` in a
thread pool: at most `workers` at once, one per key. A pass returns an `Outcome`:
the status version it wrote (its watch event is no change), when to look again,
and which other objects it depends on (the FineTuneJob a deployment follows): a
change to one of them wakes it. Failures are
retried with per-key exponential backoff; a 429's Retry-After is honoured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from kubetune.operator.core.workqueue import Backoff, QueueShutDownError, WorkQueue
from kubetune.operator.kube import ApiError
from kubetune.operator.metrics import (
    QUEUE_DEPTH,
    QUEUE_RETRIES,
    RECONCILE_ERRORS,
    RECONCILE_SECONDS,
    RECONCILES,
)
from kubetune.operator.settings import Settings as OperatorSettings

Key = tuple[str, str]  # (namespace, name)
Dependency = tuple[str, str]  # (kind, name) of an object in the same namespace
log = logging.getLogger("kubetune.controller")
# How soon an object whose namespace is being deleted is looked at again, if it is still there.
TERMINATING_RECHECK_SECONDS = 30.0


@dataclass(frozen=True)
class Outcome:
    """What one pass did: the status version it wrote and when to look again."""

    written_version: str | None = None
    requeue_after: float | None = None
    gone: bool = False  # the object no longer exists: forget its key
    depends_on: frozenset[Dependency] = frozenset()  # objects in its namespace whose changes it must see


class PassFailedError(Exception):
    """A pass failed, and the failure was written onto the object's status: the version that write made.

    The controller retries the original error with backoff; the write's own watch event is not a change.
    """

    def __init__(self, error: Exception, written_version: str | None) -> None:
        super().__init__(str(error))
        self.error, self.written_version = error, written_version


@dataclass(frozen=True)
class ControllerSettings:
    workers: int = 16
    backoff: Backoff = field(default_factory=Backoff)
    # Events for a key being processed (or just processed) wait until they have stopped for this long.
    coalesce: float = 0.5
    coalesce_max: float = 5.0

    @classmethod
    def of(cls, settings: OperatorSettings) -> ControllerSettings:
        return cls(
            workers=settings.workers,
            backoff=Backoff(settings.backoff_base_seconds, settings.backoff_max_seconds),
            coalesce=settings.coalesce_seconds,
            coalesce_max=settings.coalesce_max_seconds,
        )


class Controller:
    """Reconciles the objects of one kind, each key by one worker at a time."""

    def __init__(
        self,
        kind: str,
        reconcile: Callable[[Key], Outcome],
        executor: Executor,
        settings: ControllerSettings | None = None,
    ) -> None:
        settings = settings or ControllerSettings()
        self.kind = kind
        self._reconcile, self._executor = reconcile, executor
        self._depends_on: dict[Key, frozenset[Dependency]] = {}  # what each object's last pass said
        # When each dependency last changed (a count of changes), so a pass can tell whether one it
        # depends on changed while it ran: then it did not see that change.
        self._dependency_changes: dict[tuple[str, str, str], int] = {}
        self._changes = 0
        self.settings = settings
        self.queue: WorkQueue[Key] = WorkQueue(settings.backoff, settings.coalesce, settings.coalesce_max)
        self._written: dict[Key, str] = {}  # the status resourceVersion each key's last pass wrote
        self._seen_during_pass: dict[Key, set[str]] = {}  # versions of the object that arrived mid-pass
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def enqueue(self, key: Key, version: str | None = None) -> None:
        """An event about the object (`version`: its resourceVersion) or about something it depends on."""
        if version is not None:
            if self._written.get(key) == version:
                return  # our own status write coming back
            if self.queue.processing(key):
                # Possibly the write of the pass in progress: decided when the pass ends.
                self._seen_during_pass.setdefault(key, set()).add(version)
                return
        self.queue.add_event(key)
        QUEUE_DEPTH.labels(self.kind).set(len(self.queue))

    def dependency_changed(self, kind: str, namespace: str, name: str) -> None:
        """An object others may depend on changed: look again at the ones that do."""
        self._changes += 1
        self._dependency_changes[(kind, namespace, name)] = self._changes
        needed = (kind, name)
        for key in [key for key, needs in self._depends_on.items() if key[0] == namespace and needed in needs]:
            self.enqueue(key)

    def start(self, caches_synced: Iterable[asyncio.Event] = ()) -> None:
        """Start the workers; they wait until every cache is filled before their first pass."""
        self._tasks.append(asyncio.create_task(self._await_caches(list(caches_synced))))
        self._tasks += [
            asyncio.create_task(self._work(), name=f"kubetune-{self.kind}-{n}") for n in range(self.settings.workers)
        ]

    async def stop(self) -> None:
        self.queue.shut_down()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _await_caches(self, synced: list[asyncio.Event]) -> None:
        for event in synced:
            await event.wait()
        self._ready.set()

    async def _work(self) -> None:
        await self._ready.wait()
        loop = asyncio.get_running_loop()
        while True:
            try:
                key = await self.queue.get()
            except QueueShutDownError:
                return
            QUEUE_DEPTH.labels(self.kind).set(len(self.queue))
            started, changes = time.perf_counter(), self._changes
            written, missed = None, False
            try:
                outcome = await loop.run_in_executor(self._executor, self._reconcile, key)
            except Exception as error:  # every failure is retried with backoff
                if isinstance(error, PassFailedError):
                    written, error = error.written_version, error.error
                    if written is not None:
                        self._written[key] = written
                self._failed(key, error)
            else:
                written = outcome.written_version
                missed = any(
                    self._dependency_changes.get((kind, key[0], name), 0) > changes for kind, name in outcome.depends_on
                )
                self._succeeded(key, outcome)
            RECONCILE_SECONDS.labels(self.kind).observe(time.perf_counter() - started)
            changed = self._seen_during_pass.pop(key, set()) - {written}
            if missed or changed:
                self.queue.add_event(key)  # the object, or one it depends on, changed meanwhile
            self.queue.done(key)
            if not self.queue.in_progress:
                self._dependency_changes.clear()  # no pass can have missed these

    def _succeeded(self, key: Key, outcome: Outcome) -> None:
        RECONCILES.labels(self.kind, "ok").inc()
        self.queue.forget(key)
        if outcome.gone:
            self.queue.drop(key)
            self._written.pop(key, None)
            self._depends_on.pop(key, None)
            return
        if outcome.depends_on:
            self._depends_on[key] = outcome.depends_on
        else:
            self._depends_on.pop(key, None)
        if outcome.written_version is not None:
            self._written[key] = outcome.written_version
        if outcome.requeue_after is not None:
            self.queue.add_after(key, outcome.requeue_after)

    def _failed(self, key: Key, error: Exception) -> None:
        namespace, name = key
        if isinstance(error, ApiError) and error.namespace_terminating:
            # Not a failure: deleting the namespace deletes the object, and that event ends the key.
            # A slow look again covers a deletion that stalls; backoff would only add noise.
            RECONCILES.labels(self.kind, "ok").inc()
            self.queue.forget(key)
            self.queue.add_after(key, TERMINATING_RECHECK_SECONDS)
            log.info("%s %s/%s: its namespace is being deleted", self.kind, namespace, name)
            return
        RECONCILES.labels(self.kind, "error").inc()
        kind = _error_kind(error)
        RECONCILE_ERRORS.labels(self.kind, kind).inc()
        QUEUE_RETRIES.labels(self.kind).inc()
        retry_after = error.retry_after if isinstance(error, ApiError) else None
        delay = self.queue.add_rate_limited(key, at_least=retry_after or 0.0)
        if kind == "unexpected":
            log.exception("reconcile of %s %s/%s failed; retrying in %.1f s", self.kind, namespace, name, delay)
        else:
            log.info("reconcile of %s %s/%s will be retried in %.1f s: %s", self.kind, namespace, name, delay, error)


def _error_kind(error: Exception) -> str:
    if not isinstance(error, ApiError):
        return "unexpected"
    if error.conflict:
        return "conflict"
    if error.throttled:
        return "throttled"
    return "api"
