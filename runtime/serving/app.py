"""kubetune's Ray Serve application: one deployment that serves an exported model over HTTP.

In a Serve config: `import_path: kubetune.runtime.serving.app:build`, `args:` a
ServeAppArgs (camelCase). Routes, below the application's route prefix:

- `POST /v1/predict` (text and image classifiers), batched;
- `POST /v1/completions` and `POST /v1/chat/completions` (causal LMs, OpenAI-compatible;
  `stream: true` answers as server-sent events), non-streamed requests batched;
- `GET /v1/models`, and `GET /healthz` (`{"status": "ok"}`, open also with auth: the
  replica exists only once its model is loaded and warmed up).

Before a route reads a body, guard.py checks the bearer token and the body's size. A
replica runs at most `maxConcurrentGenerations` model calls at once, batches and streams
together; a stream beyond them gets 429 with Retry-After.

Requests are batched (see batching.py): a batch runs as soon as the model is free, with
the requests that waited meanwhile, up to `batching.maxBatchSize` inputs; a request
that finds the model idle waits up to `batching.batchWaitTimeoutMs` for company.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations as objects,
# and Serve's ingress wrapping hides the module's names from string annotations.
import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Generator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from kubetune.runtime.contract import Task
from kubetune.runtime.contract.serving import REPLICA_ENVIRONMENT, SERVE_LOGGING, ServeAppArgs
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.serving import api, predict
from kubetune.runtime.serving.batching import Batcher, GenerationSlots
from kubetune.runtime.serving.errors import RequestError, error_body
from kubetune.runtime.serving.guard import Admission, FixedToken, RequestGuard, TokenFile, TokenSource, max_body_bytes
from kubetune.runtime.serving.loading import Loaded, load
from ray import serve
from ray.serve import metrics

LOGGER = logging.getLogger(__name__)
BATCH_SIZE_HEADER = "X-Batch-Size"
# What a refused stream is told to wait before it tries again: about what a short generation takes.
BUSY_RETRY_AFTER_S = 1
HEALTH_PATH = "/healthz"
T = TypeVar("T")
web = FastAPI(title="kubetune", docs_url=None, redoc_url=None, openapi_url=None)


def replica_admission() -> Admission | None:
    """The admission of the replica this process serves (None until its constructor has run)."""
    replica = serve.get_replica_context().servable_object
    return getattr(replica, "admission", None)


# Added before @serve.ingress, which serves a copy of the app as it is then.
web.add_middleware(RequestGuard, admission=replica_admission, open_paths=frozenset({HEALTH_PATH}))


def _problem(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestError)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _invalid(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's validation errors as one message naming the field (400 for a body that is not JSON)."""
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body("the body is not valid JSON", "invalid_request_error"), status_code=400)
    text = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = f"{param}: {text}" if param else text
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=422)


def _failed(request: Request, error: Exception) -> JSONResponse:
    LOGGER.exception("request failed", exc_info=error)
    return JSONResponse(error_body("the model failed on this request", "server_error"), status_code=500)


web.add_exception_handler(RequestError, _problem)
web.add_exception_handler(RequestValidationError, _invalid)
web.add_exception_handler(Exception, _failed)


def answered(body: dict[str, Any], batch_size: int) -> JSONResponse:
    """The answer, with the size of the batch it ran in (`X-Batch-Size`: what batching achieved)."""
    return JSONResponse(body, headers={BATCH_SIZE_HEADER: str(batch_size)})


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def token_source(args: ServeAppArgs) -> TokenSource | None:
    """Where the replica finds the bearer token clients must send; None when the endpoint is open."""
    if args.auth_token_file is not None:
        source: TokenSource = TokenFile(Path(args.auth_token_file))
        where = f"the file {args.auth_token_file}"
    elif args.auth_token_env is not None:
        source = FixedToken(os.environ.get(args.auth_token_env, ""))
        where = f"the environment variable {args.auth_token_env}"
    else:
        return None
    if source.current() is None:
        raise RuntimeError(f"auth is on but {where} holding the token is empty or unreadable")
    return source


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(web)
class ModelServer:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeAppArgs.model_validate(args)
        settings = RuntimeSettings.from_environment()
        predict.FAULT["input"] = settings.faults.serve_input
        self.loaded: Loaded = load(self.args, settings)
        self.limits = api.Limits.of(self.args)
        self.created = int(time.time())
        self.admission = Admission(
            token_source(self.args), max_body_bytes(self.args.max_inputs_per_request, self.args.max_input_chars)
        )
        # One batch at a time, in a thread of its own: torch uses every core for one batch, and the
        # event loop keeps taking requests meanwhile (they form the next batch). Streamed generations
        # run in threads of their own, and share a few slots with the batches (429 beyond them).
        model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-model")
        self._slots = GenerationSlots(self.args.max_concurrent_generations)
        batching = self.args.batching
        size, wait, slots = batching.max_batch_size, batching.batch_wait_timeout_ms / 1000, self._slots
        loaded = self.loaded
        self._classifier: Batcher[Any, predict.Prediction] = Batcher(
            lambda _, inputs: predict.classify(loaded, inputs), model_thread, size, wait, self._sized, slots
        )

        def generate(sampling: Any, prompts: list[str]) -> list[predict.Completion]:
            return predict.complete(loaded, prompts, sampling)  # requests of a batch share their sampling

        self._generator: Batcher[str, predict.Completion] = Batcher(
            generate, model_thread, size, wait, self._sized, slots
        )
        self._requests = metrics.Counter(
            "kubetune_serve_requests",
            "Requests by route and status.",
            tag_keys=("route", "status"),  # type: ignore[arg-type]  # the stub says one key; any number work
        )
        self._latency = metrics.Histogram(
            "kubetune_serve_request_seconds",
            "Time to answer a request (to its first byte when streamed), by route.",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
            tag_keys=("route",),
        )
        self._batch_size = metrics.Histogram(
            "kubetune_serve_batch_size", "Inputs per model call.", boundaries=[1, 2, 4, 8, 16, 32, 64, 128]
        )

    def _require(self, *tasks: Task) -> None:
        if self.loaded.task not in tasks:
            raise RequestError(404, f"this endpoint serves a {self.loaded.task.value} model", kind="not_found_error")

    def _record(self, route: str, status: int, started: float) -> None:
        self._requests.inc(tags={"route": route, "status": str(status)})
        self._latency.observe(time.perf_counter() - started, tags={"route": route})

    def _sized(self, size: int) -> None:
        self._batch_size.observe(size)

    @web.get(HEALTH_PATH)
    async def healthz_route(self) -> dict[str, Any]:
        return {"status": "ok"}  # open even with auth: nothing about the model (GET /v1/models names it)

    @web.get("/v1/models")
    async def models_route(self, request: Request) -> dict[str, Any]:
        return api.models_body(self.loaded.name, self.created)

    @web.post("/v1/predict")
    async def predict_route(self, request: Request, body: api.PredictRequest) -> JSONResponse:
        started = time.perf_counter()
        self._require(Task.TEXT_CLASSIFICATION, Task.IMAGE_CLASSIFICATION)
        items = self.limits.inputs(body.inputs, "inputs")
        inputs: list[str] | list[bytes] = (
            api.decode_images(items) if self.loaded.task == Task.IMAGE_CLASSIFICATION else items
        )
        predictions, size = await self._classifier.submit(inputs)
        self._record("/v1/predict", 200, started)
        return answered(api.predictions_body(self.loaded.name, predictions), size)

    @web.post("/v1/completions")
    async def completions_route(self, request: Request, body: api.CompletionRequest) -> Any:
        started = time.perf_counter()
        self._require(Task.CAUSAL_LM)
        prompts = self.limits.inputs(body.prompt, "prompt")
        sampling = self.limits.sampling(body)
        if body.stream:
            if len(prompts) > 1:
                raise RequestError(422, "stream takes one prompt", "prompt")
            identity = api.new_id("cmpl")
            await self._take_slot()
            chunks = (
                api.completion_chunk(identity, self.loaded.name, text, finish)
                for text, finish in predict.stream(self.loaded, prompts[0], sampling)
            )
            return self._events(chunks, "/v1/completions", started)
        completions, size = await self._generator.submit(prompts, sampling)
        self._record("/v1/completions", 200, started)
        return answered(api.completion_body(self.loaded.name, completions), size)

    @web.post("/v1/chat/completions")
    async def chat_route(self, request: Request, body: api.ChatRequest) -> Any:
        started = time.perf_counter()
        self._require(Task.CAUSAL_LM)
        contents = self.limits.inputs([message.content for message in body.messages], "messages")
        messages = [{"role": m.role, "content": c} for m, c in zip(body.messages, contents, strict=True)]
        prompt = predict.chat_prompt(self.loaded, messages)
        sampling = self.limits.sampling(body, body.max_completion_tokens)
        if body.stream:
            identity = api.new_id("chatcmpl")
            await self._take_slot()

            def chunks() -> Generator[dict[str, Any], None, None]:
                yield api.chat_chunk(identity, self.loaded.name, {"role": "assistant", "content": ""}, None)
                for text, finish in predict.stream(self.loaded, prompt, sampling):
                    yield api.chat_chunk(identity, self.loaded.name, {"content": text} if text else {}, finish)

            return self._events(chunks(), "/v1/chat/completions", started)
        completions, size = await self._generator.submit([prompt], sampling)
        self._record("/v1/chat/completions", 200, started)
        return answered(api.chat_body(self.loaded.name, completions[0]), size)

    async def _take_slot(self) -> None:
        """A slot for a streamed generation, or 429: the replica runs as many model calls as it may."""
        if not await self._slots.try_take():
            busy = f"the replica runs {self._slots.count} generations already; try again shortly"
            raise RequestError(429, busy, kind="rate_limit_error", retry_after=BUSY_RETRY_AFTER_S)

    def _events(self, chunks: Generator[dict[str, Any], None, None], route: str, started: float) -> StreamingResponse:
        """Server-sent events: one `data:` line per chunk, then `data: [DONE]`.

        Generation runs in a thread of its own, started here with the slot `_take_slot` took; the
        thread gives the slot back once the generation has stopped: at its end, or one token after
        the client has gone.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[bytes | None] = asyncio.Queue()
        gone = threading.Event()

        def put(event: bytes | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the replica is stopping
                loop.call_soon_threadsafe(events.put_nowait, event)

        def produce() -> None:
            try:
                for chunk in chunks:
                    put(_event(chunk))
                    if gone.is_set():
                        break
            except Exception as error:
                if isinstance(error, predict.ModelCallError):
                    LOGGER.warning("a streamed generation failed: %s", error)
                else:
                    LOGGER.exception("a streamed generation failed", exc_info=error)
                put(_event(error_body("the model failed on this request", "server_error")))
            finally:
                chunks.close()  # stops the generation (predict.stream's own thread) and waits for it
                self._slots.release_from_thread()
                put(None)

        try:
            threading.Thread(target=produce, name="kubetune-stream", daemon=True).start()
        except BaseException:
            self._slots.release()
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                first = True
                while (event := await events.get()) is not None:
                    if first:
                        self._record(route, 200, started)
                        first = False
                    yield event
                yield b"data: [DONE]\n\n"
            finally:  # also when the client has gone and the response is cancelled
                gone.set()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def application(
    args: ServeAppArgs, *, num_cpus: float | None = None, env: dict[str, str] | None = None
) -> serve.Application:
    """The application serving `args`; `num_cpus` and `env` set each replica's CPUs and environment.

    In a cluster a Serve config sets them (its `deployments` and the pods' environment);
    this is for running Serve from Python, e.g. `kubetune serve`.
    """
    # A replica holds enough requests to fill two batches: one running, one gathering.
    options: dict[str, Any] = {
        "max_ongoing_requests": max(32, 2 * args.batching.max_batch_size),
        "logging_config": SERVE_LOGGING,
    }
    actor: dict[str, Any] = {}
    if num_cpus is not None:
        actor["num_cpus"] = num_cpus
    actor["runtime_env"] = {"env_vars": {**REPLICA_ENVIRONMENT, **(env or {})}}
    options["ray_actor_options"] = actor
    deployment: Any = ModelServer  # @serve.deployment made it a Deployment
    bound: serve.Application = deployment.options(**options).bind(args.to_wire())
    return bound


def build(args: dict[str, Any]) -> serve.Application:
    """The application for a Serve config's `args` (a ServeAppArgs, camelCase): its import path's target."""
    return application(ServeAppArgs.model_validate(args))
