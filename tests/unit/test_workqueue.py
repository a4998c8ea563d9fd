"""The work queue: one pass per key at a time, coalesced events, delays, backoff. Driven on a real event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from kubetune.operator.core.workqueue import Backoff, QueueShutDownError, WorkQueue

T = TypeVar("T")
Key = tuple[str, str]
A, B = ("ns", "a"), ("ns", "b")


def run(test: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(test())


async def taken(queue: WorkQueue[Key], timeout: float = 0.5) -> Key | None:
    """The next key, or None when none comes within `timeout`."""
    try:
        return await asyncio.wait_for(queue.get(), timeout)
    except TimeoutError:
        return None


def test_adds_before_a_key_is_taken_give_one_pass() -> None:
    async def scenario() -> None:
        queue: WorkQueue[Key] = WorkQueue()
        for _ in range(50):
            queue.add(A)
        queue.add(B)
        assert len(queue) == 2
        assert [await taken(queue), await taken(queue), await taken(queue, 0.05)] == [A, B, None]

    run(scenario)


def test_a_key_being_processed_comes_back_once_after_done() -> None:
    async def scenario() -> None:
        queue: WorkQueue[Key] = WorkQueue()
        queue.add(A)
        assert await taken(queue) == A
        for _ in range(10):
            queue.add(A)  # while processing: marked, not handed to another worker
        assert await taken(queue, 0.05) is None
        queue.done(A)
        assert await taken(queue) == A
        queue.done(A)
        assert await taken(queue, 0.05) is None

    run(scenario)


def test_events_for_a_quiet_key_are_handled_at_once_and_a_burst_coalesces() -> None:
    async def scenario() -> None:
        queue: WorkQueue[Key] = WorkQueue(coalesce=0.2, coalesce_max=5.0)
        queue.add_event(A)
        assert await taken(queue, 0.05) == A  # quiet key: no delay
        for _ in range(20):  # a burst of events while, and just after, the key is processed
            queue.add_event(A)
            await asyncio.sleep(0.01)
        queue.done(A)
        assert await taken(queue, 0.1) is None  # still settling
        assert await taken(queue, 0.3) == A  # one pass once the events stopped for 0.2 s
        queue.done(A)
        assert await taken(queue, 0.4) is None

    run(scenario)


def test_a_steady_stream_of_events_is_still_handled_within_coalesce_max() -> None:
    async def scenario() -> None:
        queue: WorkQueue[Key] = WorkQueue(coalesce=0.1, coalesce_max=0.3)
        queue.add_event(A)
        assert await taken(queue) == A
        queue.done(A)
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def stream() -> None:
            while loop.time() - start < 1.0:
                queue.add_event(A)
                await asyncio.sleep(0.05)  # never quiet for 0.1 s

        events = asyncio.create_task(stream())
        assert await taken(queue, 0.6) == A
        assert loop.time() - start < 0.5  # not starved by the stream
        await events

    run(scenario)


def test_add_after_keeps_the_earliest_time() -> None:
    async def scenario() -> None:
        queue: WorkQueue[Key] = WorkQueue()
        queue.add_after(A, 0.3)
        queue.add_after(A, 0.05)
        queue.add_after(A, 10.0)
        assert queue.delayed == 1
        assert await taken(queue, 0.2) == A

    run(scenario)


def test_backoff_doubles_per_failure_up_to_the_cap_and_forget_resets_it() -> None:
    backoff = Backoff(base=0.5, cap=3.0)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]

    async def scenario() -> None:
        queue: WorkQueue[Key] = WorkQueue(Backoff(base=0.01, cap=1.0))
        assert [queue.add_rate_limited(A) for _ in range(3)] == [0.01, 0.02, 0.04]
        assert queue.add_rate_limited(A, at_least=0.5) == 0.5  # a Retry-After longer than the backoff wins
        assert queue.failures(A) == 4
        queue.forget(A)
        assert queue.add_rate_limited(A) == 0.01

    run(scenario)


def test_drop_forgets_a_deleted_key_and_shut_down_stops_the_workers() -> None:
    async def scenario() -> None:
        queue: WorkQueue[Key] = WorkQueue()
        queue.add_after(A, 0.05)
        queue.drop(A)
        assert queue.delayed == 0 and await taken(queue, 0.1) is None
        waiting = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        queue.shut_down()
        with pytest.raises(QueueShutDownError):
            await waiting
        queue.add(B)
        assert len(queue) == 0

    run(scenario)
