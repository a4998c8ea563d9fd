"""Run a key's reconcile again later: one thread and a heap, however many objects wait."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor

Key = tuple[str, str]


class Requeuer:
    """Calls `callback(key)` on `executor` once the key's earliest requested time has come."""

    def __init__(self, callback: Callable[[Key], None], executor: Executor) -> None:
        self._callback = callback
        self._executor = executor
        self._heap: list[tuple[float, Key]] = []
        self._due: dict[Key, float] = {}
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="kubetune-requeue", daemon=True)
        self._thread.start()

    def after(self, key: Key, seconds: float) -> None:
        due = time.monotonic() + max(0.0, seconds)
        with self._wake:
            if key in self._due and self._due[key] <= due:
                return  # an earlier wake-up is already planned
            self._due[key] = due
            heapq.heappush(self._heap, (due, key))
            self._wake.notify()

    def pending(self) -> int:
        with self._wake:
            return len(self._due)

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._wake.wait(timeout)
                if self._stopped:
                    return
                due, key = heapq.heappop(self._heap)
                if self._due.get(key) != due:
                    continue  # superseded by an earlier entry
                del self._due[key]
            self._executor.submit(self._callback, key)
