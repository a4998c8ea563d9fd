"""A watch-fed cache of one kind's objects: list once, then watch, with a server-side label selector.

What the controllers read of the objects they own (a job's RayJobs, its reports,
its pods) comes from here instead of requests: each object is kept as the compact
value `transform` makes of it (the planner's view of a RayJob, a bounded report),
never as the object itself, indexed by the key of the object that owns it. Lists are read in
pages, each page transformed before the next is asked for. Changes go to
`on_event` on the event loop.

The watch runs in a thread per namespace (the API client
blocks); reads are safe from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kubetune.operator.kube import LIST_PAGE_SIZE, ApiError, Kube, Stream

log = logging.getLogger("kubetune.informer")
V = TypeVar("V")
Key = tuple[str, str]  # (namespace, name)
Manifest = dict[str, Any]
WATCH_SECONDS = 300
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Change(Generic[V]):
    """One object changed: ADDED, MODIFIED or DELETED, with its value after (None when deleted) and its owner."""

    type: str
    namespace: str
    name: str
    value: V | None
    owner: Key | None


@dataclass(frozen=True)
class Source:
    """Which objects an informer holds."""

    api_version: str
    kind: str
    label_selector: str | None = None
    # Objects per list request: the whole page is in memory at once (before `transform`), so kinds whose
    # objects anyone may make large (a ConfigMap takes up to 1 MiB) are read in small pages.
    page_size: int = LIST_PAGE_SIZE


def owner_label(label: str) -> Callable[[Manifest], Key | None]:
    """An informer's `owner`: the object of the same namespace named by the child's `label`."""

    def owner(child: Manifest) -> Key | None:
        meta = child["metadata"]
        name = (meta.get("labels") or {}).get(label)
        return (meta.get("namespace") or "", name) if name else None

    return owner


class Informer(Generic[V]):
    def __init__(
        self,
        kube: Kube,
        source: Source,
        namespaces: list[str] | None,
        transform: Callable[[Manifest], V | None],
        owner: Callable[[Manifest], Key | None] = lambda _: None,
    ) -> None:
        """`transform` makes the value kept of an object (None: not kept); `owner` the key it is indexed by.

        `namespaces`: where to watch; None watches the whole cluster.
        """
        self._kube, self.source = kube, source
        self._transform, self._owner = transform, owner
        self._scopes: list[str | None] = list(namespaces) if namespaces else [None]
        self._values: dict[Key, V] = {}
        self._owners: dict[Key, Key] = {}  # object → owner
        self._owned: dict[Key, dict[Key, V]] = {}  # owner → its objects
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._streams: dict[str | None, list[Stream]] = {}  # each scope's open watch
        self._listed: set[str | None] = set()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_event: Callable[[Change[V]], None] = lambda change: None
        self.synced = asyncio.Event()  # every scope listed once

    def start(self, on_event: Callable[[Change[V]], None] | None = None) -> None:
        """Start watching (from the event loop that `on_event` and `synced` belong to)."""
        self._loop = asyncio.get_running_loop()
        if on_event is not None:
            self._on_event = on_event
        for scope in self._scopes:
            name = f"kubetune-{self.source.kind.lower()}-{scope or 'all'}"
            thread = threading.Thread(target=self._run, args=(scope,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            streams = [stream for open_streams in self._streams.values() for stream in open_streams]
        for stream in streams:  # ends a watch blocked on the socket
            stream.interrupt()
        for thread in self._threads:
            thread.join(timeout=5)

    def get(self, namespace: str, name: str) -> V | None:
        with self._lock:
            return self._values.get((namespace, name))

    def owned_by(self, owner: Key) -> list[V]:
        """The values of the objects `owner` owns."""
        with self._lock:
            return list(self._owned.get(owner, {}).values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def _run(self, scope: str | None) -> None:
        """List, then watch from the list's version; a failed watch resumes where it was, an expired one lists."""
        failures, version = 0, None
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._list(scope)
                version = self._watch(scope, version)
                failures = 0
            except ApiError as error:
                if self._stopping.is_set():
                    return
                if error.expired:
                    version = None  # too old to resume from: list again, at once
                    continue
                delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                failures += 1
                where = scope or "all namespaces"
                log.warning("watching %s in %s failed, again in %.0f s: %s", self.source.kind, where, delay, error)
                self._stopping.wait(delay)
            except Exception:  # the cache must outlive any one bad object or answer
                log.exception("watching %s failed; listing again", self.source.kind)
                version = None
                self._stopping.wait(RETRY_SECONDS[-1])

    def _list(self, scope: str | None) -> str:
        """Read every object page by page, keeping only what `transform` makes of each; the list's version."""
        source = self.source
        with self._lock:
            known = {key for key in self._values if scope is None or key[0] == scope}
        listed: set[Key] = set()
        changes: list[Change[V] | None] = []
        version = ""
        pages = self._kube.list_pages(
            source.api_version,
            source.kind,
            scope,
            label_selector=source.label_selector,
            page_size=source.page_size,
        )
        for page, page_version in pages:
            version = page_version
            for item in page:
                key = _key(item)
                listed.add(key)
                changes.append(self._apply("ADDED" if key not in known else "MODIFIED", key, item))
            del page  # the raw objects go before the next page arrives
        changes = [self._apply("DELETED", key, None) for key in known - listed] + changes
        with self._lock:
            self._listed.add(scope)
            everything = len(self._listed) == len(self._scopes)
        if everything:
            self._call(self.synced.set)
        for change in changes:
            if change is not None:
                self._call(self._on_event, change)
        return version

    def _watch(self, scope: str | None, version: str) -> str:
        streams: list[Stream] = []
        with self._lock:
            self._streams[scope] = streams
        source = self.source
        events = self._kube.watch(
            source.api_version,
            source.kind,
            scope,
            WATCH_SECONDS,
            resource_version=version,
            label_selector=source.label_selector,
            streams=streams,
        )
        try:
            for kind, item in events:
                version = (item.get("metadata") or {}).get("resourceVersion") or version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    change = self._apply(kind, _key(item), None if kind == "DELETED" else item)
                    if change is not None:
                        self._call(self._on_event, change)
        finally:
            with self._lock:
                self._streams.pop(scope, None)
        return version

    def _apply(self, kind: str, key: Key, item: Manifest | None) -> Change[V] | None:
        """Store what `item` becomes (or forget the object); the change, unless its value stayed the same."""
        value = self._transform(item) if item is not None else None
        owner = self._owner(item) if item is not None and value is not None else None
        with self._lock:
            before, before_owner = self._values.get(key), self._owners.get(key)
            if before is not None and before_owner is not None:
                self._owned[before_owner].pop(key, None)
                if not self._owned[before_owner]:
                    del self._owned[before_owner]
            self._values.pop(key, None)
            self._owners.pop(key, None)
            if value is not None:
                self._values[key] = value
                if owner is not None:
                    self._owners[key] = owner
                    self._owned.setdefault(owner, {})[key] = value
        if value == before and owner == before_owner:
            return None  # nothing the controllers look at changed (or not an object this cache keeps)
        if value is None:
            kind = "DELETED"  # gone, or no longer one of ours
        return Change(kind, key[0], key[1], value, owner or before_owner)

    def _call(self, callback: Callable[..., object], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the operator stopped
            loop.call_soon_threadsafe(callback, *args)


def _key(item: Manifest) -> Key:
    meta = item["metadata"]
    return meta.get("namespace") or "", meta["name"]
