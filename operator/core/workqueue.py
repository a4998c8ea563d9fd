"""A coalescing, rate-limited work queue of object keys (client-go's workqueue, for one event loop).

- A key waits in the queue at most once (the dirty set): any number of adds before
  it is taken give one pass.
- A key is processed by one worker at a time: adds while it is processed mark it
  dirty, and it comes back once, after `done`.
- Events coalesce: an event for a key that is quiet is processed at once; events
  for a key that is being processed, or was moments ago, wait until they have
  stopped for `coalesce` seconds (at most `coalesce_max`), so a burst of events
  gives one pass at its start and one after it.
- `add_after` (requeue-after, Retry-After) and `add_rate_limited` (exponential
  backoff per key, capped; `forget` resets it) add the key later; the earliest
  requested time wins.

Not thread-safe: every method runs on the event loop that created the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Backoff:
    """Delay before the n-th retry of a failing key: base · 2ⁿ⁻¹, at most `cap`."""

    base: float = 0.2
    cap: float = 300.0

    def delay(self, failures: int) -> float:
        return min(self.cap, self.base * 2.0 ** max(0, failures - 1))


class QueueShutDownError(Exception):
    """The queue was shut down: workers stop."""


class WorkQueue(Generic[K]):
    def __init__(
        self,
        backoff: Backoff = Backoff(),
        coalesce: float = 0.0,
        coalesce_max: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backoff = backoff
        self.coalesce, self.coalesce_max = coalesce, coalesce_max
        self._clock = clock
        self._ready: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[K, int] = {}
        self._started: dict[K, float] = {}  # when each key's latest pass started
        self._settling: dict[K, tuple[float, asyncio.TimerHandle]] = {}  # coalescing keys: first event, timer
        self._wake = asyncio.Event()
        self._shut_down = False

    def __len__(self) -> int:
        """Keys waiting to be processed now (not the delayed ones)."""
        return len(self._ready)

    @property
    def delayed(self) -> int:
        return len(self._timers)

    def add(self, key: K) -> None:
        """Process the key now, or once its current pass is done."""
        if self._shut_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._ready.append(key)
            self._wake.set()

    def add_event(self, key: K) -> None:
        """Process the key for an event: now if it is quiet, else once its events have settled."""
        if self._shut_down:
            return
        now = self._clock()
        started = self._started.get(key)
        busy = key in self._processing or (started is not None and now - started < self.coalesce)
        settling = self._settling.pop(key, None)
        if settling is None and not busy:
            self.add(key)
            return
        first = now
        if settling is not None:
            first = settling[0]
            settling[1].cancel()
        delay = max(0.0, min(self.coalesce, first + self.coalesce_max - now))
        handle = asyncio.get_running_loop().call_later(delay, self._settled, key)
        self._settling[key] = (first, handle)

    def add_after(self, key: K, seconds: float) -> None:
        """Process the key in `seconds`, unless an earlier time is already set."""
        if self._shut_down:
            return
        if seconds <= 0:
            self.add(key)
            return
        due = self._clock() + seconds
        current = self._timers.get(key)
        if current is not None:
            if current[0] <= due:
                return
            current[1].cancel()
        handle = asyncio.get_running_loop().call_later(seconds, self._fire, key)
        self._timers[key] = (due, handle)

    def add_rate_limited(self, key: K, at_least: float = 0.0) -> float:
        """Retry the key after its next backoff delay (or `at_least`, if longer); returns the delay."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = max(self.backoff.delay(failures), at_least)
        self.add_after(key, delay)
        return delay

    def processing(self, key: K) -> bool:
        return key in self._processing

    @property
    def in_progress(self) -> int:
        """Keys being processed now."""
        return len(self._processing)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        """The key succeeded: its next failure starts the backoff again."""
        self._failures.pop(key, None)

    def drop(self, key: K) -> None:
        """The object is gone: forget everything about the key (a pass in progress still ends with `done`)."""
        self.forget(key)
        self._started.pop(key, None)
        for timers in (self._timers, self._settling):
            timer = timers.pop(key, None)
            if timer is not None:
                timer[1].cancel()

    async def get(self) -> K:
        """The next key to process; the caller must call `done(key)` when the pass is over."""
        while not self._ready:
            if self._shut_down:
                raise QueueShutDownError
            self._wake.clear()
            await self._wake.wait()
        if self._shut_down:
            raise QueueShutDownError
        key = self._ready.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        self._started[key] = self._clock()
        if self._ready:
            self._wake.set()  # another worker may take the next key
        return key

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._ready.append(key)
            self._wake.set()

    def shut_down(self) -> None:
        self._shut_down = True
        for timers in (self._timers, self._settling):
            for _, handle in timers.values():
                handle.cancel()
            timers.clear()
        self._wake.set()

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _settled(self, key: K) -> None:
        self._settling.pop(key, None)
        self.add(key)
