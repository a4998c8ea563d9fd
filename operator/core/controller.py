"""The controller core shared by every kind: a work queue of keys, workers, retries, metrics.

kopf handlers only hand keys to `Controller.enqueue`. Workers (coroutines on kopf's
event loop) take keys from the queue, read what the kind needs from the watch-fed
caches on the loop (`snapshot`, cheap and consistent), and run the kind's blocking
`reconcile` in a thread pool, at most `workers` at once and one per key. The result
is an `Outcome`: the status version the pass wrote (its watch event is no change)
and when to look again. Failures are retried with per-key exponential backoff;
a 429's Retry-After is honoured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

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
S = TypeVar("S")
log = logging.getLogger("kubetune.controller")


@dataclass(frozen=True)
class Outcome:
    """What one pass did: the status version it wrote and when to look again."""

    written_version: str | None = None
    requeue_after: float | None = None
    gone: bool = False  # the object no longer exists: forget its key


@dataclass(frozen=True)
class ControllerSettings:
    workers: int = 16
    backoff: Backoff = field(default_factory=Backoff)
    # Passes of one key started by events are at least this far apart (bursts coalesce).
    min_interval: float = 0.5

    @classmethod
    def of(cls, settings: OperatorSettings) -> ControllerSettings:
        return cls(
            workers=settings.workers,
            backoff=Backoff(settings.backoff_base_seconds, settings.backoff_max_seconds),
            min_interval=settings.min_interval_seconds,
        )


class Controller(Generic[S]):
    """Reconciles the objects of one kind, each key by one worker at a time."""

    def __init__(
        self,
        kind: str,
        snapshot: Callable[[Key], S],
        reconcile: Callable[[Key, S], Outcome],
        executor: Executor,
        settings: ControllerSettings = ControllerSettings(),
        secret_users: Callable[[str, str], Iterable[Key]] = lambda namespace, name: (),
    ) -> None:
        """`secret_users(namespace, name)`: the keys of the objects that name that Secret."""
        self.kind = kind
        self._secret_users = secret_users
        self._snapshot, self._reconcile, self._executor = snapshot, reconcile, executor
        self.settings = settings
        self.queue: WorkQueue[Key] = WorkQueue(settings.backoff, settings.min_interval)
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

    def secret_changed(self, namespace: str, name: str) -> None:
        """A Secret appeared or disappeared: look again at the objects that name it."""
        for key in self._secret_users(namespace, name):
            self.enqueue(key)

    def start(self, caches_synced: asyncio.Event | None = None) -> None:
        """Start the workers; they wait for `caches_synced` before their first pass."""
        if caches_synced is None:
            self._ready.set()
        else:
            self._tasks.append(asyncio.create_task(self._await_caches(caches_synced)))
        self._tasks += [
            asyncio.create_task(self._work(), name=f"kubetune-{self.kind}-{n}") for n in range(self.settings.workers)
        ]

    async def stop(self) -> None:
        self.queue.shut_down()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _await_caches(self, synced: asyncio.Event) -> None:
        await synced.wait()
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
            try:
                snapshot = self._snapshot(key)
                started = time.perf_counter()
                try:
                    outcome = await loop.run_in_executor(self._executor, self._reconcile, key, snapshot)
                finally:
                    RECONCILE_SECONDS.labels(self.kind).observe(time.perf_counter() - started)
            except Exception as error:
                written = None
                self._failed(key, error)
            else:
                written = outcome.written_version
                self._succeeded(key, outcome)
            finally:
                seen = self._seen_during_pass.pop(key, set()) - {written}
                if seen:
                    self.queue.add_event(key)  # someone else changed the object meanwhile
                self.queue.done(key)

    def _succeeded(self, key: Key, outcome: Outcome) -> None:
        RECONCILES.labels(self.kind, "ok").inc()
        self.queue.forget(key)
        if outcome.gone:
            self.queue.drop(key)
            self._written.pop(key, None)
            return
        if outcome.written_version is not None:
            self._written[key] = outcome.written_version
        if outcome.requeue_after is not None:
            self.queue.add_after(key, outcome.requeue_after)

    def _failed(self, key: Key, error: Exception) -> None:
        RECONCILES.labels(self.kind, "error").inc()
        kind = _error_kind(error)
        RECONCILE_ERRORS.labels(self.kind, kind).inc()
        QUEUE_RETRIES.labels(self.kind).inc()
        retry_after = error.retry_after if isinstance(error, ApiError) else None
        delay = self.queue.add_rate_limited(key, at_least=retry_after or 0.0)
        namespace, name = key
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
