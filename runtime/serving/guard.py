"""What a serving replica checks before it reads a request's body: the bearer token, then the body's size.

FastAPI reads and parses a route's body before the route runs, so a check inside the
route comes too late: a caller without a token could make the replica buffer and parse
any body, and learn field names from the validation errors. `RequestGuard` is ASGI
middleware in front of the routes: it answers 401 without reading the body, 413 when
`Content-Length` is over the limit, and reads a chunked body only up to the limit.

The token is fixed (an environment variable: `kubetune serve`, tests) or a file that is
re-read when it changes (a mounted Secret, which kubelet updates in place by swapping a
symlink), so a rotated Secret takes effect without restarting the replica.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kubetune.runtime.serving.errors import RequestError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOGGER = logging.getLogger(__name__)
# The most bytes one character of an input takes in a JSON body: a character outside Unicode's
# basic plane is 4 bytes of UTF-8, or 12 escaped (`\ud83d\ude00`, Python's json.dumps by default).
JSON_BYTES_PER_CHARACTER = 12
# Per input: quotes, separators, whitespace, a chat message's role and keys.
JSON_BYTES_PER_INPUT = 256
# Per request: everything else (sampling parameters, stop strings, model name).
JSON_BYTES_PER_REQUEST = 64 * 1024


def max_body_bytes(max_inputs: int, max_input_chars: int) -> int:
    """The largest body a request within the replica's limits on inputs can need."""
    return max_inputs * (max_input_chars * JSON_BYTES_PER_CHARACTER + JSON_BYTES_PER_INPUT) + JSON_BYTES_PER_REQUEST


def check_bearer(header: str | None, token: str) -> bool:
    """Whether `Authorization` carries the token (compared in constant time); an empty token matches nothing."""
    scheme, _, given = (header or "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class TokenSource(Protocol):
    def current(self) -> str | None:
        """The token clients must send now; None when there is none to compare with (every request is refused)."""


@dataclass(frozen=True)
class FixedToken:
    """A token that never changes (from the environment)."""

    token: str

    def current(self) -> str | None:
        return self.token or None


@dataclass
class TokenFile:
    """A token in a file, read again whenever the file changes (a stat per request: cheap).

    A mounted Secret's file is a symlink that kubelet points at a new folder on an update,
    so its inode changes; a file edited in place changes its modification time or size.
    """

    path: Path
    _seen: tuple[int, int, int, int] | None = field(default=None, init=False)
    _token: str | None = field(default=None, init=False)

    def current(self) -> str | None:
        try:
            state = os.stat(self.path)
            seen = (state.st_dev, state.st_ino, state.st_mtime_ns, state.st_size)
            if seen != self._seen:
                self._token = self.path.read_text().strip() or None
                self._seen = seen
        except OSError as error:  # refuse every request rather than keep a token the Secret no longer holds
            LOGGER.warning("cannot read the bearer token from %s: %s", self.path, error)
            self._seen, self._token = None, None
        return self._token


@dataclass(frozen=True)
class Admission:
    """What a replica lets through: requests with the token (any when `token` is None), bodies up to a size."""

    token: TokenSource | None
    max_body_bytes: int


def _route_path(scope: Scope) -> str:
    """The path below the application's route prefix (Serve passes the prefix as `root_path`)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


class RequestGuard:
    """ASGI middleware: the token, then the body's size, checked before the application reads the body.

    `admission` gives the replica's Admission when a request arrives (None: let everything through,
    e.g. before the replica exists). `open_paths` answer GET and HEAD without a token (health checks).
    """

    def __init__(self, app: ASGIApp, admission: Callable[[], Admission | None], open_paths: frozenset[str]) -> None:
        self.app, self.admission, self.open_paths = app, admission, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admission = self.admission() if scope["type"] == "http" else None
        if admission is None:
            await self.app(scope, receive, send)
            return
        try:
            self._authorize(scope, admission)
            self._check_length(scope, admission.max_body_bytes)
            body = await _read_body(receive, admission.max_body_bytes)
        except RequestError as error:
            await JSONResponse(error.body(), status_code=error.status, headers=error.headers())(scope, receive, send)
            return
        if body is None:  # the client went away while sending
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorize(self, scope: Scope, admission: Admission) -> None:
        if admission.token is None:
            return
        if scope["method"] in ("GET", "HEAD") and _route_path(scope) in self.open_paths:
            return
        token = admission.token.current()
        if token is None or not check_bearer(_header(scope, b"authorization"), token):
            raise RequestError(401, "a valid bearer token is required", kind="authentication_error")

    @staticmethod
    def _check_length(scope: Scope, limit: int) -> None:
        length = _header(scope, b"content-length")
        if length is None:
            return
        if not length.strip().isdigit():
            raise RequestError(400, "Content-Length is not a number")
        if int(length) > limit:
            raise RequestError(413, f"the body has {int(length)} bytes; at most {limit}")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None when the client disconnected; a body over `limit` stops the reading (413)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise RequestError(413, f"the body is over {limit} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the application the body already read, then what the server sends (disconnects)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed
