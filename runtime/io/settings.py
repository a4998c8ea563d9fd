"""Where the runtime finds mounted volumes and keeps downloads: the machine's side of a run.

Kept apart from the run contract: the same spec runs in a cluster (volumes under
/mnt/pvc, a cache on the pod's disk) and locally (anything the user points to).
Every field is read from the environment as KUBETUNE_<FIELD NAME IN CAPITALS>;
docs/configuration.md is generated from this class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

ENV_PREFIX = "KUBETUNE_"
DEFAULT_PVC_ROOT = Path("/mnt/pvc")


class SettingsError(ValueError):
    """An environment variable holds a value the setting cannot take; the message names it."""


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubetune"


class Faults(BaseModel):
    """Failures the resilience tests ask for. Never set in production."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train_step: int | None = Field(
        default=None,
        ge=1,
        description=(
            "The first training worker raises once, after this optimizer step, unless it resumed from a "
            "checkpoint: proves that a run survives a lost worker."
        ),
    )
    preempt_step: int | None = Field(
        default=None,
        ge=1,
        description="The last training worker sends itself SIGTERM after this optimizer step, unless it resumed "
        "from a checkpoint: proves that a preempted run resumes from the step it was stopped at.",
    )
    serve_input: str | None = Field(
        default=None,
        min_length=1,
        description="An endpoint's model fails on a request with this exact input: proves that one bad batch "
        "does not take the replica down.",
    )


def _fault_pairs(value: Any) -> Any:
    """KUBETUNE_FAULTS's `name=value` pairs, comma-separated, as the fields of Faults."""
    if not isinstance(value, str):
        return value
    pairs = (item.partition("=") for item in value.split(",") if item.strip())
    faults: dict[str, str] = {}
    for name, equals, raw in pairs:
        if not equals:
            raise ValueError(f"{name.strip()!r} is not name=value")
        faults[name.strip()] = raw.strip()
    return faults


class RuntimeSettings(BaseSettings):
    """Machine-specific locations, and the faults a test asks for."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="ignore")

    pvc_root: Path = Field(
        default=DEFAULT_PVC_ROOT,
        description="`pvc://<claim>/<path>` resolves to `<pvc_root>/<claim>/<path>`. The operator sets it in the "
        "pods it builds (it mounts the claims there).",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="s3:// models and data are downloaded here before use.",
        json_schema_extra={"shown_default": "$XDG_CACHE_HOME/kubetune (~/.cache/kubetune)"},
    )
    run_config: Path | None = Field(
        default=None,
        description="The run config `python -m kubetune.runtime.recipe.finetune` (and `.plan`) reads when --config is "
        "not given. The operator sets it in a run's pods.",
    )
    preemption_notice: Path | None = Field(
        default=None,
        description="A file whose existence tells the training workers of this machine to save a checkpoint at "
        "their next optimizer step and stop, as SIGTERM to a worker does: the run resumes from that step. The "
        "operator sets it in a run's pods; a worker pod's preStop hook creates it.",
    )
    faults: Annotated[Faults, NoDecode, BeforeValidator(_fault_pairs)] = Field(
        default_factory=Faults,
        description="Fault injection for resilience tests, comma-separated name=value pairs (train_step=N, "
        "preempt_step=N, serve_input=TEXT; a value holds no comma). Never set in production.",
    )
    # Use an s3:// download already in the cache as is. Training workers set this: the driver has just
    # downloaded the same objects for this run, and workers need not hold S3 credentials to reuse them.
    # Private: not a setting of the environment.
    _reuse_downloads: bool = PrivateAttr(default=False)

    @classmethod
    def from_environment(cls) -> Self:
        """The settings of this process's environment; a bad value raises SettingsError naming its variable."""
        try:
            return cls()
        except ValidationError as error:
            raise SettingsError("; ".join(_problem(problem["loc"], problem) for problem in error.errors())) from None
        except SourceError as error:
            raise SettingsError(str(error)) from None

    @property
    def reuse_downloads(self) -> bool:
        return self._reuse_downloads

    def reusing_downloads(self) -> RuntimeSettings:
        """These settings for a process that uses the s3:// downloads already in the cache as they are."""
        copy = self.model_copy()
        copy._reuse_downloads = True
        return copy


def _problem(location: tuple[int | str, ...], problem: Any) -> str:
    """One validation problem as `VARIABLE='raw': what is wrong` (`KUBETUNE_FAULTS name='raw'` within one)."""
    variable = ENV_PREFIX + str(location[0]).upper()
    within = f" {'.'.join(map(str, location[1:]))}" if len(location) > 1 else ""
    return f"{variable}{within}={problem['input']!r}: {problem['msg']}"
