"""kubetune's Ray Serve application: one deployment that serves an exported model over HTTP.

In a Serve config: `import_path: kubetune.runtime.serving.app:build`, `args:` a
ServeAppArgs (camelCase). Routes, below the application's route prefix:

- `POST /v1/predict` (text and image classifiers), batched;
- `POST /v1/completions` and `POST /v1/chat/completions` (causal LMs, OpenAI-compatible;
  `stream: true` answers as server-sent events), non-streamed requests batched;
- `GET /v1/models`, and `GET /healthz` (`{"status": "ok"}`, open also with auth: the
  replica exists only once its model is loaded and warmed up).

Requests are batched (see batching.py): a batch runs as soon as the model is free, with
the requests that waited meanwhile, up to `batching.maxBatchSize` inputs; a request
that finds the model idle waits up to `batching.batchWaitTimeoutMs` for company.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations as objects,
# and Serve's ingress wrapping hides the module's names from string annotations.
import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from kubetune.runtime.contract import Task
from kubetune.runtime.contract.serving import REPLICA_ENVIRONMENT, SERVE_LOGGING, ServeAppArgs
from kubetune.runtime.serving import api, predict
from kubetune.runtime.serving.api import RequestError
from kubetune.runtime.serving.batching import Batcher
from kubetune.runtime.serving.loading import Loaded, load
from kubetune.runtime.settings import RuntimeSettings
from ray import serve
from ray.serve import metrics

LOGGER = logging.getLogger(__name__)
FAULT_VARIABLE = "KUBETUNE_SERVE_FAULT_INPUT"
BATCH_SIZE_HEADER = "X-Batch-Size"
T = TypeVar("T")
web = FastAPI(title="kubetune", docs_url=None, redoc_url=None, openapi_url=None)


def _problem(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestError)
    headers = {"WWW-Authenticate": 'Bearer realm="kubetune"'} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _invalid(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's validation errors as one message naming the field (400 for a body that is not JSON)."""
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return JSONResponse(api.error_body("the body is not valid JSON", "invalid_request_error"), status_code=400)
    text = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = f"{param}: {text}" if param else text
    return JSONResponse(api.error_body(message, "invalid_request_error", param), status_code=422)


def _failed(request: Request, error: Exception) -> JSONResponse:
    LOGGER.exception("request failed", exc_info=error)
    return JSONResponse(api.error_body("the model failed on this request", "server_error"), status_code=500)


web.add_exception_handler(RequestError, _problem)
web.add_exception_handler(RequestValidationError, _invalid)
web.add_exception_handler(Exception, _failed)


def answered(body: dict[str, Any], batch_size: int) -> JSONResponse:
    """The answer, with the size of the batch it ran in (`X-Batch-Size`: what batching achieved)."""
    return JSONResponse(body, headers={BATCH_SIZE_HEADER: str(batch_size)})


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(web)
class ModelServer:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeAppArgs.model_validate(args)
        predict.FAULT["input"] = os.environ.get(FAULT_VARIABLE) or None
        self.loaded: Loaded = load(self.args, RuntimeSettings.from_environment())
        self.limits = api.Limits.of(self.args)
        self.created = int(time.time())
        self._token = self._read_token()
        # One model call at a time, in a thread of its own: torch uses every core for one batch,
        # and the event loop keeps taking requests meanwhile (they form the next batch).
        model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-model")
        batching = self.args.batching
        size, wait = batching.max_batch_size, batching.batch_wait_timeout_ms / 1000
        loaded = self.loaded
        self._classifier: Batcher[Any, predict.Prediction] = Batcher(
            lambda _, inputs: predict.classify(loaded, inputs), model_thread, size, wait, self._sized
        )

        def generate(sampling: Any, prompts: list[str]) -> list[predict.Completion]:
            return predict.complete(loaded, prompts, sampling)  # requests of a batch share their sampling

        self._generator: Batcher[str, predict.Completion] = Batcher(generate, model_thread, size, wait, self._sized)
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

    def _read_token(self) -> str | None:
        variable = self.args.auth_token_env
        if variable is None:
            return None
        token = os.environ.get(variable, "")
        if not token:
            raise RuntimeError(f"auth is on but the environment variable {variable} holding the token is empty")
        return token

    def _authorize(self, request: Request) -> None:
        if self._token is not None and not api.check_bearer(request.headers.get("authorization"), self._token):
            raise RequestError(401, "a valid bearer token is required", kind="authentication_error")

    def _require(self, *tasks: Task) -> None:
        if self.loaded.task not in tasks:
            raise RequestError(404, f"this endpoint serves a {self.loaded.task.value} model", kind="not_found_error")

    def _record(self, route: str, status: int, started: float) -> None:
        self._requests.inc(tags={"route": route, "status": str(status)})
        self._latency.observe(time.perf_counter() - started, tags={"route": route})

    def _sized(self, size: int) -> None:
        self._batch_size.observe(size)

    @web.get("/healthz")
    async def healthz_route(self) -> dict[str, Any]:
        return {"status": "ok"}  # open even with auth: nothing about the model (GET /v1/models names it)

    @web.get("/v1/models")
    async def models_route(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return api.models_body(self.loaded.name, self.created)

    @web.post("/v1/predict")
    async def predict_route(self, request: Request, body: api.PredictRequest) -> JSONResponse:
        started = time.perf_counter()
        self._authorize(request)
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
        self._authorize(request)
        self._require(Task.CAUSAL_LM)
        prompts = self.limits.inputs(body.prompt, "prompt")
        sampling = self.limits.sampling(body)
        if body.stream:
            if len(prompts) > 1:
                raise RequestError(422, "stream takes one prompt", "prompt")
            identity = api.new_id("cmpl")
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
        self._authorize(request)
        self._require(Task.CAUSAL_LM)
        contents = self.limits.inputs([message.content for message in body.messages], "messages")
        messages = [{"role": m.role, "content": c} for m, c in zip(body.messages, contents, strict=True)]
        prompt = predict.chat_prompt(self.loaded, messages)
        sampling = self.limits.sampling(body, body.max_completion_tokens)
        if body.stream:
            identity = api.new_id("chatcmpl")

            def chunks() -> Iterator[dict[str, Any]]:
                yield api.chat_chunk(identity, self.loaded.name, {"role": "assistant", "content": ""}, None)
                for text, finish in predict.stream(self.loaded, prompt, sampling):
                    yield api.chat_chunk(identity, self.loaded.name, {"content": text} if text else {}, finish)

            return self._events(chunks(), "/v1/chat/completions", started)
        completions, size = await self._generator.submit([prompt], sampling)
        self._record("/v1/chat/completions", 200, started)
        return answered(api.chat_body(self.loaded.name, completions[0]), size)

    def _events(self, chunks: Iterator[dict[str, Any]], route: str, started: float) -> StreamingResponse:
        """Server-sent events: one `data:` line per chunk, then `data: [DONE]`."""

        async def body() -> AsyncIterator[bytes]:
            first = True
            try:
                while True:
                    # Waits for tokens, not for the model thread: batched calls go on meanwhile.
                    chunk = await asyncio.to_thread(next, chunks, None)
                    if chunk is None:
                        break
                    if first:
                        self._record(route, 200, started)
                        first = False
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            except predict.ModelCallError as error:
                LOGGER.warning("a streamed generation failed: %s", error)
                failure = api.error_body("the model failed on this request", "server_error")
                yield b"data: " + json.dumps(failure).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

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
