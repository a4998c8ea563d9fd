"""The serving replica's limits, in this process through its ASGI app (no Ray): what it reads before the token
check, how large a body it takes, how many generations it runs at once, and a token file rotated under it.

A tiny random-initialised Llama is the model; Serve's replica context is replaced by one that names the
replica built here, as Serve's own replica names the one it built.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from .tiny import tiny_llama

TOKEN = "limits-token"
TOKEN_VARIABLE = "KUBETUNE_TEST_LIMITS_TOKEN"
MIB = 1 << 20


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("lm"))


@pytest.fixture
def replica(lm_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Builds the replica of these args (camelCase) and makes it the one the app serves."""
    from kubetune.runtime.serving.app import ModelServer
    from ray import serve

    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN)
    replicas: list[Any] = []
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=replicas[-1]))
    deployment: Any = ModelServer  # @serve.deployment made it a Deployment
    server_class = deployment.func_or_class.__mro__[1]  # the class under Serve's ingress wrapper

    def build(**args: Any) -> Any:
        replicas.append(server_class({"modelUri": str(lm_folder), "maxNewTokens": 8, **args}))
        return replicas[-1]

    return build


@dataclass
class Exchange:
    """One request to the app, and what came back so far."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    chunks_read: int = 0
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # the response has started
    leave: asyncio.Event = field(default_factory=asyncio.Event)  # set: the client disconnects
    task: asyncio.Task[None] | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        return [line.removeprefix("data: ") for line in self.body.decode().split("\n\n") if line.startswith("data: ")]

    async def done(self) -> Exchange:
        assert self.task is not None
        await asyncio.wait_for(self.task, 60)
        return self


def start(
    path: str,
    body: Any = None,
    token: str | None = TOKEN,
    chunks: Iterator[bytes] | None = None,
    length: int | None = None,
    method: str = "POST",
) -> Exchange:
    """Sends a request to the app on this loop: `body` as JSON, or `chunks` (chunked unless `length`)."""
    from kubetune.runtime.serving.app import web

    headers = [(b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if body is not None:
        data = json.dumps(body).encode()
        chunks, length = iter([data]), len(data)
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    pieces = iter(chunks or [])
    exchange = Exchange()
    ended = threading.Event()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        piece = next(pieces, None)
        if piece is not None:
            exchange.chunks_read += 1
            return {"type": "http.request", "body": piece, "more_body": True}
        if not ended.is_set():
            ended.set()
            return {"type": "http.request", "body": b"", "more_body": False}
        await exchange.leave.wait()  # then the server waits to hear of a disconnect
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            exchange.status = message["status"]
            exchange.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            exchange.answered.set()
        elif message["type"] == "http.response.body":
            exchange.chunks.append(message.get("body", b""))

    exchange.task = asyncio.get_running_loop().create_task(web(scope, receive, send))
    return exchange


async def call(path: str, body: Any = None, **options: Any) -> Exchange:
    return await start(path, body, **options).done()


def endless(size: int = MIB, total: int | None = None) -> Iterator[bytes]:
    """`total` bytes (or endless) in chunks of one reused buffer: the test itself holds no more than a chunk."""
    chunk, sent = b"x" * size, 0
    while total is None or sent < total:
        sent += size
        yield chunk


def resident() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def test_a_200_mib_body_without_the_token_is_refused_before_it_is_read(replica: Callable[..., Any]) -> None:
    replica(authTokenEnv=TOKEN_VARIABLE)

    async def scenario() -> None:
        await call("/v1/completions", {"prompt": "warm up"})  # the app's first request builds its stack
        for length in (200 * MIB, None):  # announced, or chunked
            before, peak = resident(), [0]

            async def sample(peak: list[int] = peak) -> None:
                while True:
                    peak[0] = max(peak[0], resident())
                    await asyncio.sleep(0.005)

            sampler = asyncio.create_task(sample())
            refused = await call("/v1/completions", chunks=endless(total=200 * MIB), length=length, token=None)
            sampler.cancel()
            grown = max(peak[0], resident()) - before
            print(
                f"200 MiB without a token (Content-Length: {length}): {refused.status}, peak RSS {grown / MIB:+.1f} MiB"
            )
            assert refused.status == 401 and refused.chunks_read == 0
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert grown < 16 * MIB
        # Nothing of the body is parsed: an empty object gets 401, not a 422 that names the fields.
        empty = await call("/v1/completions", {}, token=None)
        assert empty.status == 401 and "prompt" not in empty.body.decode()
        assert (await call("/v1/completions", {}, token="wrong")).status == 401
        assert (await call("/v1/completions", {})).status == 422  # with the token, the fields are checked
        assert (await call("/v1/models", method="GET", token=None)).status == 401
        health = await call("/healthz", method="GET", token=None)
        assert health.status == 200

    asyncio.run(scenario())


def test_a_body_over_the_replicas_limit_is_413_announced_or_chunked(replica: Callable[..., Any]) -> None:
    from kubetune.runtime.serving.guard import max_body_bytes

    replica(authTokenEnv=TOKEN_VARIABLE, maxInputsPerRequest=4, maxInputChars=1000)
    limit = max_body_bytes(4, 1000)

    async def scenario() -> None:
        announced = await call("/v1/completions", chunks=endless(), length=limit + 1)
        assert announced.status == 413 and announced.chunks_read == 0
        assert announced.json()["error"]["message"].endswith(f"at most {limit}")
        chunked = await call("/v1/completions", chunks=endless(size=4096))
        assert chunked.status == 413 and chunked.chunks_read == limit // 4096 + 1
        # The largest request the input limits allow still gets through.
        largest = {"prompt": ["\U0001f600" * 1000] * 4, "max_tokens": 2, "temperature": 0}
        assert (await call("/v1/completions", largest)).status == 200

    asyncio.run(scenario())


@pytest.mark.parametrize(("stop", "param"), [("s" * 257, "stop"), (["ok", "s" * 300], "stop")])
def test_a_stop_string_over_256_characters_is_422_naming_the_field(
    replica: Callable[..., Any], stop: Any, param: str
) -> None:
    replica()

    async def scenario() -> None:
        refused = await call("/v1/completions", {"prompt": "hi", "stop": stop}, token=None)
        assert refused.status == 422 and refused.json()["error"]["param"] == param
        assert "at most 256" in refused.json()["error"]["message"]
        answered = await call("/v1/completions", {"prompt": "hi", "stop": ["s" * 256], "max_tokens": 2}, token=None)
        assert answered.status == 200

    asyncio.run(scenario())


def test_a_rotated_token_file_is_honoured_without_a_restart(replica: Callable[..., Any], tmp_path: Path) -> None:
    file = tmp_path / "token"
    file.write_text("first-token\n")
    replica(authTokenFile=str(file))

    async def scenario() -> None:
        assert (await call("/v1/completions", {"prompt": "a", "max_tokens": 1}, token="first-token")).status == 200
        replacement = tmp_path / "token.new"
        replacement.write_text("second-token\n")
        replacement.replace(file)  # a new file in the old one's place, as kubelet's symlink swap makes it
        assert (await call("/v1/completions", {"prompt": "a", "max_tokens": 1}, token="first-token")).status == 401
        assert (await call("/v1/completions", {"prompt": "a", "max_tokens": 1}, token="second-token")).status == 200

    asyncio.run(scenario())


def test_a_replica_without_its_token_does_not_start(replica: Callable[..., Any], tmp_path: Path) -> None:
    (tmp_path / "token").write_text("")
    with pytest.raises(RuntimeError, match="token is empty or unreadable"):
        replica(authTokenFile=str(tmp_path / "token"))
    with pytest.raises(RuntimeError, match="KUBETUNE_TEST_UNSET"):
        replica(authTokenEnv="KUBETUNE_TEST_UNSET")


class HeldGenerations:
    """Stands in for predict.stream: generations that go on, a piece every 10 ms, until finished or closed."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.finish: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def __call__(self, loaded: Any, prompt: str, sampling: Any) -> Iterator[tuple[str, str | None]]:
        finish = self.finish.setdefault(prompt, threading.Event())
        with self.lock:
            self.running.add(prompt)
        try:
            while not finish.wait(0.01):
                yield "x", None
            yield "", "stop"
        finally:  # closed: the client went away
            with self.lock:
                self.running.discard(prompt)


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the timeout"
        await asyncio.sleep(0.02)


def stream_of(prompt: str) -> dict[str, Any]:
    return {"prompt": prompt, "stream": True, "max_tokens": 8}


def test_streams_beyond_the_replicas_generations_get_429_until_one_ends(
    replica: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.runtime.serving import predict

    held = HeldGenerations()
    monkeypatch.setattr(predict, "stream", held)
    replica(maxConcurrentGenerations=2)

    async def scenario() -> None:
        first, second = start("/v1/completions", stream_of("first")), start("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "second"}], "stream": True,
        })  # fmt: skip
        await asyncio.wait_for(asyncio.gather(first.answered.wait(), second.answered.wait()), 10)
        assert first.status == second.status == 200
        await eventually(lambda: len(held.running) == 2)
        for body in (stream_of("third"), {"messages": [{"role": "user", "content": "x"}], "stream": True}):
            refused = await call("/v1/" + ("chat/completions" if "messages" in body else "completions"), body)
            assert refused.status == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
        # A batched request shares the slots: it waits for one instead of running a third generation.
        batched = start("/v1/completions", {"prompt": "batched", "max_tokens": 2, "temperature": 0})
        await asyncio.sleep(0.3)
        assert not batched.answered.is_set()

        held.finish["first"].set()  # the first stream ends: its slot goes to the waiting batch
        assert (await first.done()).events()[-1] == "[DONE]"
        assert (await batched.done()).status == 200
        await eventually(lambda: len(held.running) == 1)

        second.leave.set()  # the second stream's client disconnects: its generation stops, its slot is free
        await second.done()
        await eventually(lambda: not held.running)
        held.finish["fourth"] = threading.Event()
        fourth = start("/v1/completions", stream_of("fourth"))
        await asyncio.wait_for(fourth.answered.wait(), 10)
        assert fourth.status == 200
        held.finish["fourth"].set()
        assert (await fourth.done()).events()[-1] == "[DONE]"

    asyncio.run(scenario())


def test_a_real_stream_gives_its_slot_back_when_it_ends(replica: Callable[..., Any]) -> None:
    replica(maxConcurrentGenerations=1)

    async def scenario() -> None:
        for _ in range(3):  # one slot: each stream is admitted only because the one before gave it back
            streamed = await call("/v1/completions", {**stream_of("the weather"), "temperature": 0})
            assert streamed.status == 200 and streamed.events()[-1] == "[DONE]"
            assert json.loads(streamed.events()[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        assert (await call("/v1/completions", {"prompt": "the weather", "max_tokens": 3})).status == 200

    asyncio.run(scenario())
