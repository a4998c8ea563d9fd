"""What a serving replica checks before it reads a body: the bearer token (fixed or a rotating file), the size."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from kubetune.runtime.serving.guard import (
    Admission,
    FixedToken,
    RequestGuard,
    TokenFile,
    check_bearer,
    max_body_bytes,
)

TOKEN = "t0ken"
LIMIT = 1000


class App:
    """Reads the whole body, as FastAPI does before a route runs, and answers 200."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def call(
    guard: RequestGuard,
    chunks: Iterator[bytes] | list[bytes],
    token: str | None = TOKEN,
    length: int | None = None,
    path: str = "/v1/predict",
    method: str = "POST",
    root_path: str = "",
) -> tuple[int, dict[str, str], Any, int]:
    """(status, headers, JSON body, how many body chunks the server handed over)."""
    headers = [(b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "method": method, "path": root_path + path, "root_path": root_path, "headers": headers}
    pieces, received, sent = iter(chunks), [0], list[MutableMapping[str, Any]]()

    async def receive() -> dict[str, Any]:
        piece = next(pieces, None)
        if piece is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        received[0] += 1
        return {"type": "http.request", "body": piece, "more_body": True}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    start = sent[0]
    found = {key.decode().lower(): value.decode() for key, value in start.get("headers", [])}
    body = b"".join(message.get("body", b"") for message in sent[1:])
    return start["status"], found, json.loads(body), received[0]


def guarded(admission: Admission | None, app: App | None = None) -> RequestGuard:
    return RequestGuard(app or App(), lambda: admission, open_paths=frozenset({"/healthz"}))


def endless(size: int = 1 << 16) -> Iterator[bytes]:
    chunk = b"x" * size
    while True:
        yield chunk


def test_without_the_token_nothing_of_the_body_is_read() -> None:
    app = App()
    guard = guarded(Admission(FixedToken(TOKEN), LIMIT), app)
    for token in (None, "wrong", TOKEN + "x", ""):
        # A huge body announced, or sent chunked: 401 before the first chunk.
        for length in (200 << 20, None):
            status, headers, body, read = call(guard, endless(), token=token, length=length)
            assert (status, read) == (401, 0)
            assert headers["www-authenticate"].startswith("Bearer")
            assert body["error"]["type"] == "authentication_error" and body["error"]["param"] is None
    # An empty object: 401, not a validation error naming the fields the route expects.
    status, _, body, _ = call(guard, [b"{}"], token=None)
    assert status == 401 and "inputs" not in json.dumps(body)
    assert app.bodies == []


def test_a_body_over_the_limit_is_refused_with_413() -> None:
    app = App()
    guard = guarded(Admission(FixedToken(TOKEN), LIMIT), app)
    status, _, body, read = call(guard, endless(), length=LIMIT + 1)
    assert (status, read) == (413, 0) and str(LIMIT) in body["error"]["message"]
    # Chunked (no Content-Length): read only up to the limit.
    status, _, body, read = call(guard, endless(100))
    assert status == 413 and read == LIMIT // 100 + 1
    assert app.bodies == []


def test_a_body_within_the_limit_reaches_the_application_whole() -> None:
    app = App()
    guard = guarded(Admission(FixedToken(TOKEN), LIMIT), app)
    assert call(guard, [b'{"inputs": ', b'"hello"}'])[0] == 200
    assert call(guard, [b"y" * LIMIT], length=LIMIT)[0] == 200
    assert app.bodies == [b'{"inputs": "hello"}', b"y" * LIMIT]


def test_an_open_endpoint_still_limits_the_body() -> None:
    guard = guarded(Admission(None, LIMIT))
    assert call(guard, [b"{}"], token=None)[0] == 200
    assert call(guard, endless(), token=None)[0] == 413


@pytest.mark.parametrize("root_path", ["", "/support"])
def test_the_health_check_needs_no_token_and_nothing_else_is_open(root_path: str) -> None:
    guard = guarded(Admission(FixedToken(TOKEN), LIMIT))
    assert call(guard, [], token=None, path="/healthz", method="GET", root_path=root_path)[0] == 200
    for method, path in (("POST", "/healthz"), ("GET", "/v1/models"), ("GET", "/healthz/x"), ("GET", "/nothing")):
        assert call(guard, [], token=None, path=path, method=method, root_path=root_path)[0] == 401


def test_a_rotated_token_file_is_honoured_at_once(tmp_path: Path) -> None:
    """As kubelet updates a Secret volume: a new folder, then the `..data` symlink swapped to it atomically."""
    mount = tmp_path / "endpoint-token"
    mount.mkdir()

    def publish(version: str, token: str) -> None:
        folder = mount / f"..{version}"
        folder.mkdir()
        (folder / "token").write_text(token + "\n")
        (mount / "..data_tmp").symlink_to(folder.name)
        os.replace(mount / "..data_tmp", mount / "..data")

    publish("2026_12_06_01", "old-token")
    (mount / "token").symlink_to("..data/token")
    guard = guarded(Admission(TokenFile(mount / "token"), LIMIT))
    assert call(guard, [b"{}"], token="old-token")[0] == 200
    publish("2026_12_06_02", "new-token")
    assert call(guard, [b"{}"], token="old-token")[0] == 401
    assert call(guard, [b"{}"], token="new-token")[0] == 200


def test_an_empty_or_missing_token_file_lets_nobody_in(tmp_path: Path) -> None:
    file = tmp_path / "token"
    file.write_text("\n")
    source = TokenFile(file)
    guard = guarded(Admission(source, LIMIT))
    assert source.current() is None
    for token in ("", " ", "anything"):
        assert call(guard, [b"{}"], token=token)[0] == 401
    file.write_text("s3cret")
    assert call(guard, [b"{}"], token="s3cret")[0] == 200
    file.unlink()
    assert call(guard, [b"{}"], token="s3cret")[0] == 401


def test_an_empty_token_matches_nothing() -> None:
    assert not check_bearer("Bearer ", "") and not check_bearer(None, "")
    assert check_bearer("bearer  t0ken ", TOKEN) and not check_bearer("Basic t0ken", TOKEN)


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_the_largest_request_within_the_input_limits_fits_the_body_limit(ensure_ascii: bool) -> None:
    """Inputs at their most and longest, of the characters JSON writes longest (escaped surrogate pairs)."""
    inputs, chars = 8, 500
    text = "\U0001f600" * chars
    predict = {"inputs": [text] * inputs}
    messages = [{"role": "assistant", "content": text, "name": "a-name-the-server-ignores"}] * inputs
    chat = {"messages": messages, "stop": ["\U0001f600" * 256] * 4, "max_tokens": 100, "temperature": 0.7}
    for body in (predict, chat):
        assert len(json.dumps(body, ensure_ascii=ensure_ascii, indent=2).encode()) <= max_body_bytes(inputs, chars)
    assert max_body_bytes(64, 16384) < 16 << 20  # the defaults: a few MiB, not 200
