"""The controller core with a scripted reconcile: concurrency, own writes, retries, Secrets, readiness."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from kubetune.operator.core.controller import Controller, ControllerSettings, Key, Outcome
from kubetune.operator.core.workqueue import Backoff
from kubetune.operator.kube import ApiError

A, B = ("ns", "a"), ("ns", "b")
FAST = ControllerSettings(workers=2, backoff=Backoff(base=0.05, cap=1.0), coalesce=0.05, coalesce_max=1.0)


class Script:
    """A reconcile that records each pass (key, start, end) and does what the test says for each key."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.passes: list[tuple[Key, float, float]] = []
        self.outcomes: dict[Key, list[Outcome | Exception]] = {}
        self.during: Callable[[Key], None] | None = None  # runs inside the pass (in its thread)
        self._lock = threading.Lock()

    def __call__(self, key: Key) -> Outcome:
        started = time.monotonic()
        if self.during is not None:
            self.during(key)
        time.sleep(self.seconds)
        with self._lock:
            self.passes.append((key, started, time.monotonic()))
            planned = self.outcomes.get(key) or []
            result = planned.pop(0) if planned else Outcome()
        if isinstance(result, Exception):
            raise result
        return result

    def count(self, key: Key) -> int:
        return sum(1 for k, _, _ in self.passes if k == key)


async def settle(seconds: float = 0.3) -> None:
    await asyncio.sleep(seconds)


def scenario(script: Script, body: Callable[[Controller], object], settings: ControllerSettings = FAST) -> None:
    async def main() -> None:
        with ThreadPoolExecutor(max_workers=settings.workers) as executor:
            controller = Controller("Thing", script, executor, settings)
            controller.start()
            try:
                result = body(controller)
                if asyncio.iscoroutine(result):
                    await result
            finally:
                await controller.stop()

    asyncio.run(main())


def test_at_most_workers_passes_run_at_once_and_never_two_for_one_key() -> None:
    script = Script(seconds=0.1)
    keys = [("ns", str(n)) for n in range(6)]

    async def body(controller: Controller) -> None:
        for key in keys:
            controller.enqueue(key)
        await settle(0.6)
        controller.enqueue(keys[0])
        await settle()

    scenario(script, body)
    spans = [(start, end) for _, start, end in script.passes]
    most = max(sum(1 for s, e in spans if s <= moment < e) for moment, _ in spans)
    assert most == FAST.workers
    assert sorted(k for k, _, _ in script.passes) == sorted([*keys, keys[0]])


def test_the_status_write_of_a_pass_does_not_cause_another() -> None:
    script = Script()
    script.outcomes[A] = [Outcome(written_version="41")]

    async def body(controller: Controller) -> None:
        controller.enqueue(A, "40")
        await settle()
        controller.enqueue(A, "41")  # the watch event of our own write
        await settle()
        controller.enqueue(A, "42")  # somebody else's change
        await settle()

    scenario(script, body)
    assert script.count(A) == 2


def test_versions_arriving_mid_pass_are_judged_when_it_ends() -> None:
    script = Script(seconds=0.2)
    script.outcomes[A] = [Outcome(written_version="7"), Outcome(written_version="9"), Outcome()]
    arriving = {1: "7", 2: "8"}  # mid-pass events: pass 1 sees its own write, pass 2 somebody else's change
    holder: list[tuple[asyncio.AbstractEventLoop, Controller]] = []

    def during(key: Key) -> None:
        version = arriving.get(len(script.passes) + 1)
        if version is not None:  # delivered on the loop meanwhile, as kopf would
            loop, controller = holder[0]
            loop.call_soon_threadsafe(controller.enqueue, key, version)

    script.during = during

    async def body(controller: Controller) -> None:
        holder.append((asyncio.get_running_loop(), controller))
        controller.enqueue(A, "6")
        await settle(0.6)
        assert script.count(A) == 1  # its own write came back mid-pass: nothing more to do
        controller.enqueue(A, "10")
        await settle(1.0)

    scenario(script, body)
    assert script.count(A) == 3  # the change that came mid-pass 2 made pass 3


def test_failures_are_retried_with_backoff_and_retry_after() -> None:
    script = Script()
    script.outcomes[A] = [
        ApiError(409, "Conflict", "changed"),
        ApiError(429, "TooManyRequests", "slow down", retry_after=0.3),
        RuntimeError("a bug"),
        Outcome(),
    ]

    async def body(controller: Controller) -> None:
        controller.enqueue(A)
        await settle(1.2)

    scenario(script, body)
    starts = [start for key, start, _ in script.passes if key == A]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert len(starts) == 4
    assert gaps[0] >= 0.05 * 0.9 and gaps[1] >= 0.3 * 0.95 and gaps[2] >= 0.2 * 0.9, gaps


def test_a_namespace_being_deleted_is_no_failure_and_no_retry_storm() -> None:
    """The API server's refusal names the cause; the object is about to go with its namespace."""
    from kubetune.operator.kube import _api_error
    from prometheus_client import REGISTRY

    answer = (
        b'{"kind":"Status","reason":"Forbidden","message":"namespace ns is being terminated","code":403,'
        b'"details":{"causes":[{"reason":"NamespaceTerminating","field":"metadata.namespace"}]}}'
    )
    refused = _api_error(403, answer)
    assert refused.namespace_terminating and not _api_error(403, b'{"reason":"Forbidden"}').namespace_terminating
    script = Script()
    script.outcomes[A] = [refused]
    errors_before = REGISTRY.get_sample_value("kubetune_reconcile_errors_total", {"kind": "Thing", "error": "api"})

    async def body(controller: Controller) -> None:
        controller.enqueue(A)
        await settle(0.5)

    scenario(script, body)
    assert script.count(A) == 1  # looked at again in 30 s, not retried with backoff
    errors = REGISTRY.get_sample_value("kubetune_reconcile_errors_total", {"kind": "Thing", "error": "api"})
    assert errors == errors_before


def test_requeue_after_and_gone() -> None:
    script = Script()
    script.outcomes[A] = [Outcome(requeue_after=0.1), Outcome(gone=True)]

    async def body(controller: Controller) -> None:
        controller.enqueue(A)
        await settle(0.5)

    scenario(script, body)
    assert script.count(A) == 2  # the requeue came; after "gone" nothing does


def test_a_secret_change_wakes_the_objects_that_name_it() -> None:
    script = Script()
    script.outcomes[A] = [Outcome(depends_on=frozenset({("Secret", "keys")}))]
    script.outcomes[B] = [Outcome(depends_on=frozenset({("Secret", "other")}))]

    async def body(controller: Controller) -> None:
        controller.enqueue(A)
        controller.enqueue(B)
        await settle()
        controller.dependency_changed("Secret", "ns", "keys")
        controller.dependency_changed("Secret", "elsewhere", "keys")
        await settle()

    scenario(script, body)
    assert (script.count(A), script.count(B)) == (2, 1)


def test_a_secret_that_changes_during_a_pass_wakes_it_again() -> None:
    script = Script(seconds=0.2)
    script.outcomes[A] = [
        Outcome(depends_on=frozenset({("Secret", "keys")})),
        Outcome(depends_on=frozenset({("Secret", "keys")})),
    ]
    holder: list[tuple[asyncio.AbstractEventLoop, Controller]] = []

    def during(key: Key) -> None:
        if not script.passes:  # the Secret appears while the first pass runs, after it looked
            loop, controller = holder[0]
            loop.call_soon_threadsafe(controller.dependency_changed, "Secret", "ns", "keys")

    script.during = during

    async def body(controller: Controller) -> None:
        holder.append((asyncio.get_running_loop(), controller))
        controller.enqueue(A)
        await settle(1.0)

    scenario(script, body)
    assert script.count(A) == 2


def test_workers_wait_for_the_caches() -> None:
    script = Script()

    async def main() -> None:
        synced = asyncio.Event()
        with ThreadPoolExecutor(max_workers=1) as executor:
            controller = Controller("Thing", script, executor, FAST)
            controller.start([synced])
            controller.enqueue(A)
            await settle(0.2)
            assert script.passes == []
            synced.set()
            await settle(0.2)
            await controller.stop()

    asyncio.run(main())
    assert script.count(A) == 1


def test_a_pass_whose_object_was_deleted_meanwhile_ends_the_key() -> None:
    from typing import Any, cast

    from kubetune.operator.kube import Kube
    from kubetune.operator.reconcile import ending_when_deleted

    class Objects:
        def __init__(self, present: bool) -> None:
            self.present = present

        def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
            return {"metadata": {"name": name}} if self.present else None

    def writes_to_a_missing_object(key: Key) -> Outcome:
        raise ApiError(404, "NotFound", "not found")

    deleted = ending_when_deleted(cast(Kube, Objects(False)), "Thing", writes_to_a_missing_object)
    assert deleted(A) == Outcome(gone=True)
    still_there = ending_when_deleted(cast(Kube, Objects(True)), "Thing", writes_to_a_missing_object)
    with pytest.raises(ApiError, match="404"):  # a kind that is not installed, say: an error to retry
        still_there(A)


def test_a_recorded_failure_is_retried_with_backoff_and_its_write_is_no_change() -> None:
    """The failure written onto the status comes back as a watch event: that is not a reason to run again."""
    from kubetune.operator.core.controller import PassFailedError

    script = Script()
    script.outcomes[A] = [PassFailedError(RuntimeError("a bug"), "51"), Outcome()]

    async def body(controller: Controller) -> None:
        controller.enqueue(A, "50")
        await settle(0.02)
        controller.enqueue(A, "51")  # the failure's own status write
        await settle(0.5)

    scenario(script, body)
    starts = [start for key, start, _ in script.passes if key == A]
    assert len(starts) == 2 and starts[1] - starts[0] >= 0.05 * 0.9  # the retry waited for its backoff


class StatusObjects:
    """A stand-in for the API client: one object whose status patches are recorded."""

    def __init__(self, status: dict[str, object] | None, fail: bool = False) -> None:
        self.body: dict[str, object] = {
            "metadata": {"name": "a", "namespace": "ns", "generation": 3, "resourceVersion": "9"},
            "status": status or {},
        }
        self.patches: list[dict[str, object]] = []
        self.fail = fail

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, object]:
        return self.body

    def patch_status(self, ref: object, status: dict[str, object], resource_version: str | None = None) -> dict:  # type: ignore[type-arg]
        if self.fail:
            raise ApiError(422, "Invalid", "status is invalid")
        self.patches.append(status)
        return {"metadata": {"resourceVersion": "10"}}


def test_an_unexpected_failure_is_written_as_degraded_keeping_the_other_conditions() -> None:
    import logging
    from datetime import UTC, datetime
    from typing import cast

    from kubetune.operator.core.controller import PassFailedError
    from kubetune.operator.kube import Kube
    from kubetune.operator.reconcile import recording_failures

    ready = {"type": "Ready", "status": "True", "reason": "Promoted", "message": "run 1", "observedGeneration": 2}
    objects = StatusObjects({"phase": "Succeeded", "conditions": [ready]})
    now = datetime(2026, 11, 28, tzinfo=UTC)

    def broken(key: Key) -> Outcome:
        raise KeyError("spec")

    recorded = recording_failures(cast(Kube, objects), "Thing", broken, lambda: now, logging.getLogger("test"))
    with pytest.raises(PassFailedError) as failure:
        recorded(A)
    assert isinstance(failure.value.error, KeyError) and failure.value.written_version == "10"
    (patch,) = objects.patches
    conditions = {c["type"]: c for c in patch["conditions"]}  # type: ignore[attr-defined]
    assert conditions["Ready"]["reason"] == "Promoted"  # what was known stays
    degraded = conditions["Degraded"]
    assert (degraded["status"], degraded["reason"], degraded["observedGeneration"]) == ("True", "ReconcileFailed", 3)
    assert degraded["message"] == "retrying after an error: KeyError: 'spec'"

    # Conflicts are normal work, not failures to show; a failing write leaves the original error to retry.
    def conflicted_write(key: Key) -> Outcome:
        raise ApiError(409, "Conflict", "changed")

    conflict = recording_failures(cast(Kube, objects), "Thing", conflicted_write, lambda: now, logging.getLogger("t"))
    with pytest.raises(PassFailedError) as conflicted:
        conflict(A)
    assert conflicted.value.written_version is None and len(objects.patches) == 1
    unwritable = StatusObjects(None, fail=True)
    failing = recording_failures(cast(Kube, unwritable), "Thing", broken, lambda: now, logging.getLogger("test"))
    with pytest.raises(PassFailedError) as unwritten:
        failing(A)
    assert isinstance(unwritten.value.error, KeyError) and unwritten.value.written_version is None
