"""The informer (list, then watch, with a label selector) against the real API server."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from kubetune.operator.core import informer as informer_module
from kubetune.operator.core.informer import Change, Informer, Source
from kubetune.operator.kube import Kube, ObjectRef

from ..controlplane import ControlPlane
from .faultproxy import FaultProxy
from .harness import eventually

SOURCE = Source("v1", "ConfigMap", "app.kubernetes.io/managed-by=kubetune,example.com/owner")


def config_map(namespace: str, name: str, owner: str | None, value: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/managed-by": "kubetune"}
    if owner:
        labels["example.com/owner"] = owner
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": {"value": value},
    }


def value_of(item: dict[str, Any]) -> str | None:
    return (item.get("data") or {}).get("value")


def owner_of(item: dict[str, Any]) -> tuple[str, str] | None:
    owner = item["metadata"]["labels"].get("example.com/owner")
    return (item["metadata"]["namespace"], owner) if owner else None


class Running:
    """An informer running on an event loop in a thread, collecting its changes."""

    def __init__(self, informer: Informer[str]) -> None:
        self.informer = informer
        self.changes: list[Change[str]] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Running:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        eventually(self.informer.synced.is_set, what="the first list")
        return self

    async def _start(self) -> None:
        self.informer.start(self.changes.append)

    def __exit__(self, *_: object) -> None:
        self.informer.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture
def quick_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(informer_module, "WATCH_SECONDS", 1)  # watches end often, so faults can hit them


def test_it_lists_then_follows_changes_of_the_selected_objects(kube: Kube, namespace: str) -> None:
    kube.create(config_map(namespace, "before", "job-a", "1"))
    kube.create(config_map(namespace, "stranger", None, "x"))  # not selected: never seen
    informer: Informer[str] = Informer(kube, SOURCE, [namespace], value_of, owner_of)
    with Running(informer) as running:
        assert informer.owned_by((namespace, "job-a")) == ["1"] and len(informer) == 1
        kube.create(config_map(namespace, "after", "job-a", "2"))
        kube.patch(ObjectRef("v1", "ConfigMap", namespace, "before"), {"data": {"value": "3"}})
        kube.patch(ObjectRef("v1", "ConfigMap", namespace, "before"), {"metadata": {"annotations": {"a": "b"}}})
        kube.delete(ObjectRef("v1", "ConfigMap", namespace, "after"))
        eventually(lambda: any(c.type == "DELETED" for c in running.changes), what="the deletion")
        seen = [(c.type, c.name, c.value, c.owner) for c in running.changes]
        owner = (namespace, "job-a")
        assert seen == [
            ("ADDED", "before", "1", owner),
            ("ADDED", "after", "2", owner),
            ("MODIFIED", "before", "3", owner),  # the annotation changed nothing the value holds: no change
            ("DELETED", "after", None, owner),
        ]
        assert informer.owned_by(owner) == ["3"] and informer.get(namespace, "stranger") is None


def test_an_expired_watch_lists_again_and_reports_what_changed_meanwhile(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path, quick_watches: None
) -> None:
    proxy = FaultProxy(control_plane.kubeconfig).start()
    try:
        through_proxy = Kube.connect(str(proxy.write_kubeconfig(tmp_path / "kubeconfig")))
        kube.create(config_map(namespace, "kept", "job-a", "1"))
        kube.create(config_map(namespace, "removed", "job-a", "1"))
        informer: Informer[str] = Informer(through_proxy, SOURCE, [namespace], value_of, owner_of)
        with Running(informer) as running:
            # The next watch fails (500): the informer waits, then resumes the watch, which is answered
            # 410 Gone (too old); meanwhile one object changes and one goes away.
            fault = proxy.fail("GET", f"/api/v1/namespaces/{namespace}/configmaps", [500, 410])
            eventually(lambda: fault.answered == [500], what="the failed watch")
            kube.patch(ObjectRef("v1", "ConfigMap", namespace, "kept"), {"data": {"value": "2"}})
            kube.delete(ObjectRef("v1", "ConfigMap", namespace, "removed"))
            eventually(lambda: informer.owned_by((namespace, "job-a")) == ["2"], what="the state after the gap")
            answered = [(r.watch, r.status) for r in proxy.recorded() if r.path.endswith("/configmaps")]
            assert answered[0] == (False, 200) and (True, 500) in answered and (True, 410) in answered
            assert answered[answered.index((True, 410)) + 1] == (False, 200)  # listed again at once
            assert answered.count((False, 200)) == 2  # and only then: a failed watch resumes
            assert [(c.type, c.name) for c in running.changes[2:]] == [("DELETED", "removed"), ("MODIFIED", "kept")]
    finally:
        proxy.stop()


def test_it_lists_in_pages_then_watches_from_the_lists_version(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    for index in range(5):
        kube.create(config_map(namespace, f"item-{index}", "job-a", str(index)))
    proxy = FaultProxy(control_plane.kubeconfig).start()
    try:
        through_proxy = Kube.connect(str(proxy.write_kubeconfig(tmp_path / "kubeconfig")))
        paged = Source(SOURCE.api_version, SOURCE.kind, SOURCE.label_selector, page_size=2)
        informer: Informer[str] = Informer(through_proxy, paged, [namespace], value_of, owner_of)
        with Running(informer) as running:
            assert sorted(informer.owned_by((namespace, "job-a"))) == ["0", "1", "2", "3", "4"]
            assert sorted(c.name for c in running.changes) == [f"item-{index}" for index in range(5)]
            lists = [r for r in proxy.recorded() if r.path.endswith("/configmaps") and not r.watch]
            assert [r.query.get("limit") for r in lists] == ["2", "2", "2"]
            assert [bool(r.query.get("continue")) for r in lists] == [False, True, True]
            # The watch goes on from the list's version: a change after the list arrives.
            kube.patch(ObjectRef("v1", "ConfigMap", namespace, "item-4"), {"data": {"value": "5"}})
            eventually(lambda: "5" in informer.owned_by((namespace, "job-a")), what="the change after the list")
    finally:
        proxy.stop()


def test_stop_ends_a_watch_at_once(kube: Kube, namespace: str) -> None:
    informer: Informer[str] = Informer(kube, SOURCE, [namespace], value_of, owner_of)
    running = Running(informer).__enter__()
    threads = list(informer._threads)
    running.__exit__()
    assert not any(thread.is_alive() for thread in threads)
