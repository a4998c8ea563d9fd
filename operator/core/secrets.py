"""Which Secrets exist: a metadata-only list and watch of Secrets, never their data.

Specs name Secrets (storage credentials, later auth tokens) that may be created
after the object that names them. This watch keeps the set of Secret names and
tells the controllers when one appears or disappears, so a job waiting for its
credentials wakes at once instead of polling. Objects arrive as
PartialObjectMetadata: the operator never receives a Secret's data.

The watch runs in a thread (the API client blocks) and hands changes to the event
loop; `exists` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import urllib3
from kubetune.operator.kube import ApiError, Kube

log = logging.getLogger("kubetune.secrets")
Name = tuple[str, str]  # (namespace, name)
WATCH_SECONDS = 120
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)


class SecretNames:
    def __init__(
        self,
        kube: Kube,
        namespaces: list[str] | None,
        on_change: Callable[[str, str], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """`on_change(namespace, name)` runs on `loop` when a Secret appears or disappears.

        `namespaces`: the namespaces to watch; None watches the whole cluster.
        """
        self._kube, self._on_change, self._loop = kube, on_change, loop
        self._scopes: list[str | None] = list(namespaces) if namespaces else [None]
        self._names: set[Name] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._streams: dict[str | None, list[urllib3.BaseHTTPResponse]] = {}  # each scope's open watch
        self._threads: list[threading.Thread] = []
        self._listed: set[str | None] = set()
        self.synced = asyncio.Event()  # every scope listed once

    def start(self) -> None:
        for scope in self._scopes:
            thread = threading.Thread(target=self._run, args=(scope,), name=f"kubetune-secrets-{scope}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            responses = [response for stream in self._streams.values() for response in stream]
        for response in responses:  # ends a watch blocked on the socket
            with contextlib.suppress(Exception):
                response.shutdown()
        for thread in self._threads:
            thread.join(timeout=5)

    def exists(self, namespace: str, name: str) -> bool:
        """Whether the Secret exists; asked of the API server (metadata only) until the first list is done."""
        if not self.synced.is_set():
            return self._kube.exists("v1", "Secret", namespace, name)
        with self._lock:
            return (namespace, name) in self._names

    def _run(self, scope: str | None) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                version = self._list(scope)
                failures = 0
                while not self._stopping.is_set():
                    version = self._watch(scope, version)
            except ApiError as error:
                if self._stopping.is_set():
                    return
                if not error.expired:  # an expired version is listed again at once
                    delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                    failures += 1
                    log.warning("watching Secrets (%s) failed, again in %.0f s: %s", scope or "all", delay, error)
                    self._stopping.wait(delay)

    def _list(self, scope: str | None) -> str:
        items, version = self._kube.list_with_version("v1", "Secret", scope, metadata_only=True)
        listed = {(item["metadata"]["namespace"], item["metadata"]["name"]) for item in items}
        with self._lock:
            before = {name for name in self._names if scope is None or name[0] == scope}
            self._names = (self._names - before) | listed
            first = scope not in self._listed
            self._listed.add(scope)
            everything = len(self._listed) == len(self._scopes)
        if first and everything:
            self._call(self.synced.set)
        for namespace, name in before ^ listed:  # changes missed while the watch was down
            self._call(self._on_change, namespace, name)
        return version

    def _watch(self, scope: str | None, version: str) -> str:
        stream: list[urllib3.BaseHTTPResponse] = []
        with self._lock:
            self._streams[scope] = stream
        events = self._kube.watch(
            "v1", "Secret", scope, WATCH_SECONDS, resource_version=version, metadata_only=True, stream=stream
        )
        try:
            for kind, item in events:
                meta = item.get("metadata") or {}
                version = meta.get("resourceVersion") or version
                if kind not in ("ADDED", "DELETED"):
                    continue  # bookmarks; a modified Secret still exists
                name = (meta["namespace"], meta["name"])
                with self._lock:
                    changed = (name in self._names) != (kind == "ADDED")
                    (self._names.add if kind == "ADDED" else self._names.discard)(name)
                if changed:
                    self._call(self._on_change, *name)
        finally:
            with self._lock:
                self._streams.pop(scope, None)
        return version

    def _call(self, callback: Callable[..., object], *args: str) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the operator stopped
            self._loop.call_soon_threadsafe(callback, *args)
