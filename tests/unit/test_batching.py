"""The serving replica's batcher: batches grow with the queue, a lone request does not wait, groups stay apart."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor

import pytest
from kubetune.runtime.serving.batching import Batcher


class Model:
    """Doubles numbers, taking `seconds` per call; records each call's group and inputs."""

    def __init__(self, seconds: float = 0.0, fail_on: int | None = None) -> None:
        self.seconds, self.fail_on = seconds, fail_on
        self.calls: list[tuple[Hashable, list[int]]] = []
        self.lock = threading.Lock()

    def __call__(self, group: Hashable, inputs: list[int]) -> list[int]:
        with self.lock:
            self.calls.append((group, list(inputs)))
        time.sleep(self.seconds)
        if self.fail_on is not None and self.fail_on in inputs:
            raise ValueError(f"cannot take {self.fail_on}")
        return [value * 2 for value in inputs]


def test_requests_that_wait_while_the_model_works_share_its_next_call() -> None:
    model = Model(seconds=0.05)

    async def scenario() -> list[tuple[list[int], int]]:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher: Batcher[int, int] = Batcher(model, executor, max_size=16, wait_s=0.0)
            first = asyncio.create_task(batcher.submit([0]))
            await asyncio.sleep(0.01)  # the model is busy with the first request
            rest = [asyncio.create_task(batcher.submit([n])) for n in range(1, 11)]
            return [await first, *[await task for task in rest]]

    results = asyncio.run(scenario())
    assert [answer for answer, _ in results] == [[n * 2] for n in range(11)]
    assert [inputs for _, inputs in model.calls] == [[0], list(range(1, 11))]
    assert [size for _, size in results] == [1] + [10] * 10


def test_a_lone_request_does_not_wait_without_a_wait_time() -> None:
    model = Model()

    async def scenario() -> float:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher: Batcher[int, int] = Batcher(model, executor, max_size=16, wait_s=0.0)
            started = time.perf_counter()
            await batcher.submit([1])
            return time.perf_counter() - started

    assert asyncio.run(scenario()) < 0.05


def test_an_idle_model_waits_for_company_up_to_the_wait_time() -> None:
    model = Model()

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher: Batcher[int, int] = Batcher(model, executor, max_size=16, wait_s=0.1)
            first = asyncio.create_task(batcher.submit([1]))
            await asyncio.sleep(0.02)
            second = asyncio.create_task(batcher.submit([2, 3]))
            await asyncio.gather(first, second)

    asyncio.run(scenario())
    assert [inputs for _, inputs in model.calls] == [[1, 2, 3]]


def test_batches_respect_max_size_whole_requests_and_groups() -> None:
    model = Model(seconds=0.05)

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher: Batcher[int, int] = Batcher(model, executor, max_size=4, wait_s=0.0)
            busy = asyncio.create_task(batcher.submit([0], "a"))
            await asyncio.sleep(0.01)
            waiting = [
                batcher.submit([1, 2], "a"),
                batcher.submit([3], "b"),  # another group: its own call
                batcher.submit([4, 5], "a"),
                batcher.submit([6, 7], "a"),  # would make 6 inputs: the next call
            ]
            await asyncio.gather(busy, *waiting)

    asyncio.run(scenario())
    assert model.calls == [("a", [0]), ("a", [1, 2, 4, 5]), ("b", [3]), ("a", [6, 7])]


def test_a_failing_request_fails_alone() -> None:
    model = Model(seconds=0.02, fail_on=13)

    async def scenario() -> list[object]:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher: Batcher[int, int] = Batcher(model, executor, max_size=16, wait_s=0.0)
            busy = asyncio.create_task(batcher.submit([0]))
            await asyncio.sleep(0.005)
            others = [batcher.submit([n]) for n in (11, 13, 17)]
            results = await asyncio.gather(busy, *others, return_exceptions=True)
            after = await batcher.submit([19])
            return [*results, after]

    results = asyncio.run(scenario())
    assert results[1] == ([22], 3) and results[3] == ([34], 3) and results[4] == ([38], 1)
    assert isinstance(results[2], ValueError)


@pytest.mark.parametrize("size", [1, 3])
def test_max_size_one_is_one_request_per_call(size: int) -> None:
    model = Model(seconds=0.01)

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher: Batcher[int, int] = Batcher(model, executor, max_size=1, wait_s=0.0)
            await asyncio.gather(*(batcher.submit([n]) for n in range(size)))

    asyncio.run(scenario())
    assert [inputs for _, inputs in model.calls] == [[n] for n in range(size)]


def test_batches_and_streams_share_the_replicas_generation_slots() -> None:
    """A batch waits for a slot a stream holds; a stream is refused while a batch waits, and gets one after."""
    from kubetune.runtime.serving.batching import GenerationSlots

    model = Model()

    async def scenario() -> None:
        slots = GenerationSlots(1)
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher: Batcher[int, int] = Batcher(model, executor, max_size=16, wait_s=0.0, slots=slots)
            assert await slots.try_take()  # a stream generates
            batch = asyncio.create_task(batcher.submit([1]))
            await asyncio.sleep(0.05)
            assert not batch.done() and model.calls == []  # the batch waits for the stream's slot
            assert not await slots.try_take()  # and a second stream is refused meanwhile
            await asyncio.to_thread(slots.release_from_thread)  # the stream's thread ends
            assert await asyncio.wait_for(batch, 5) == ([2], 1)
            assert await slots.try_take()  # the batch gave its slot back

    asyncio.run(scenario())
