"""Hyperparameter search with Ray Tune: the space, the algorithm and the scheduler."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, get_args, get_origin

from pydantic import Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from .common import ContractModel, cel_rule, with_cel
from .hyperparameters import AUTO, Hyperparameters
from .method import FreezeOptions, LoraOptions


class Metric(StrEnum):
    ACCURACY = "accuracy"
    F1 = "f1"
    LOSS = "loss"
    PERPLEXITY = "perplexity"
    # Preference objectives: the share of held-out pairs whose chosen completion the model rates above the
    # rejected one, and the mean gap between the two (mean log-probability per completion token).
    PREFERENCE_ACCURACY = "preferenceAccuracy"
    REWARD_MARGIN = "rewardMargin"


class Mode(StrEnum):
    MAX = "max"
    MIN = "min"


# The direction in which each metric improves.
METRIC_MODE: dict[Metric, Mode] = {
    Metric.ACCURACY: Mode.MAX,
    Metric.F1: Mode.MAX,
    Metric.LOSS: Mode.MIN,
    Metric.PERPLEXITY: Mode.MIN,
    Metric.PREFERENCE_ACCURACY: Mode.MAX,
    Metric.REWARD_MARGIN: Mode.MAX,
}


class ParameterType(StrEnum):
    CHOICE = "choice"
    GRID = "grid"
    UNIFORM = "uniform"
    LOGUNIFORM = "loguniform"
    RANDINT = "randint"


DISCRETE_TYPES = frozenset({ParameterType.CHOICE, ParameterType.GRID})

# Searchable settings: every hyperparameter plus a few method options. Maps the
# spec's key to the model that validates its values and that model's field alias.
_NESTED_SEARCHABLE: dict[str, tuple[type[ContractModel], str]] = {
    "lora.rank": (LoraOptions, "rank"),
    "lora.alpha": (LoraOptions, "alpha"),
    "lora.dropout": (LoraOptions, "dropout"),
    "freeze.trainableLayers": (FreezeOptions, "trainableLayers"),
}
# Not searched: early stopping is an object, memory-saving switches do not change what is learned, and
# the effective batch and sequence quantile only steer what `auto` resolves to.
_NOT_SEARCHABLE = {"earlyStopping", "gradientCheckpointing", "effectiveBatchSize", "sequenceLengthQuantile"}


def searchable_parameters() -> dict[str, tuple[type[ContractModel], str]]:
    """Every key a search space may use, with the model and field that validate it."""
    keys: dict[str, tuple[type[ContractModel], str]] = {}
    for name, field in Hyperparameters.model_fields.items():
        alias = field.alias or name
        if alias not in _NOT_SEARCHABLE:
            keys[alias] = (Hyperparameters, alias)
    keys.update(_NESTED_SEARCHABLE)
    return keys


SEARCHABLE_KEYS: tuple[str, ...] = tuple(searchable_parameters())


class SearchParameter(ContractModel):
    """The distribution of one searched setting."""

    # Numbers and names are separate typed lists, so that admission (CEL) checks every candidate too.
    model_config = with_cel(
        cel_rule(
            "self.type in ['choice', 'grid'] ? !has(self.low) && !has(self.high)"
            " : has(self.low) && has(self.high) && self.low < self.high",
            "uniform, loguniform and randint take low < high (choice and grid do not)",
            ".low",
        ),
        cel_rule("self.type != 'loguniform' || self.low > 0.0", "loguniform needs low > 0", ".low"),
        cel_rule(
            "self.type in ['choice', 'grid'] ? has(self.values) != has(self.options)"
            " : !has(self.values) && !has(self.options)",
            "choice and grid take values (numbers) or options (names); uniform, loguniform and randint neither",
            ".values",
        ),
        cel_rule(
            "self.type != 'randint' || (self.low == double(int(self.low)) && self.high == double(int(self.high)))",
            "randint needs integer low and high",
            ".low",
        ),
    )

    type: ParameterType = Field(description="choice, grid, uniform, loguniform or randint.")
    values: list[int | float] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Candidate numbers for choice and grid, for a numeric setting (e.g. learningRate, lora.rank).",
        json_schema_extra={"items": {"type": "number"}},
    )
    options: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Candidate names for choice and grid, for a named setting (optimizer, lrSchedule, precision).",
    )
    low: float | None = Field(default=None, description="Lower bound (inclusive) for uniform, loguniform and randint.")
    high: float | None = Field(
        default=None, description="Upper bound (exclusive for randint) for uniform, loguniform and randint."
    )

    @model_validator(mode="after")
    def _shape_matches_type(self) -> SearchParameter:
        if self.type in DISCRETE_TYPES:
            if (self.values is None) == (self.options is None):
                raise ValueError(f"type {self.type.value} needs values (numbers) or options (names), one of them")
            if self.low is not None or self.high is not None:
                raise ValueError(f"type {self.type.value} takes values or options, not low/high")
            return self
        if self.values is not None or self.options is not None:
            raise ValueError(f"type {self.type.value} takes low and high, not values or options")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type.value} needs both low and high")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == ParameterType.LOGUNIFORM and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        if self.type == ParameterType.RANDINT and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("randint needs integer low and high")
        return self

    @property
    def choices(self) -> list[Any]:
        """The candidates of choice and grid: the numbers or the names."""
        return list(self.values if self.values is not None else self.options or [])

    def candidate_values(self) -> list[Any]:
        """Values to type-check against the searched setting."""
        if self.type in DISCRETE_TYPES:
            return self.choices
        assert self.low is not None and self.high is not None  # guaranteed by the validator
        if self.type == ParameterType.RANDINT:
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]


class Algorithm(StrEnum):
    RANDOM = "random"
    GRID = "grid"
    TPE = "tpe"


class Scheduler(StrEnum):
    NONE = "none"
    ASHA = "asha"


class AshaOptions(ContractModel):
    """Asynchronous successive halving: stop weak trials early."""

    grace_period: int = Field(
        default=1, ge=1, le=10000, description="Evaluations every trial gets before it may be stopped."
    )
    reduction_factor: float = Field(
        default=2.0, ge=1.5, le=100.0, description="Keep roughly 1/reductionFactor of the trials at each rung."
    )


def _searchable_keys_rule() -> str:
    keys = ", ".join(f"'{k}'" for k in SEARCHABLE_KEYS)
    return f"self.all(k, k in [{keys}])"


def _bounds(field: FieldInfo, number: str) -> str:
    """CEL: the double `number` within the bounds pydantic puts on `field` ("true" when it has none)."""
    operators = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    # The bounds of an int-or-auto field sit on the int inside its union.
    inner = [
        constraint
        for kind in get_args(field.annotation)
        if get_origin(kind) is Annotated
        for item in get_args(kind)[1:]
        for constraint in (item.metadata if isinstance(item, FieldInfo) else [item])
    ]
    conditions = [
        f"{number} {symbol} {float(bound)!r}"
        for item in [*field.metadata, *inner]
        for name, symbol in operators.items()
        if (bound := getattr(item, name, None)) is not None
    ]
    return " && ".join(conditions) or "true"


def _kind(field: FieldInfo) -> type | None:
    """The type of a searchable field's values, without None and `auto` (never a search candidate)."""
    kinds = [
        (get_origin(kind) is Annotated and get_args(kind)[0]) or kind
        for kind in get_args(field.annotation) or (field.annotation,)
        if kind is not type(None) and get_args(kind) != (AUTO,)
    ]
    if len(kinds) == 1 and get_origin(kinds[0]) is Annotated:
        kinds = list(get_args(kinds[0])[:1])
    return kinds[0] if len(kinds) == 1 and isinstance(kinds[0], type) else None


def _values_rule(key: str, field: FieldInfo) -> str | None:
    """CEL, on the space: what is searched for `key` is what its field takes (kind of list, type, range).

    The same verdict as SearchSpec's check of each candidate against the field.
    """
    kind = _kind(field)
    entry = "self[k]"
    if kind is not None and issubclass(kind, StrEnum):
        names = ", ".join(f"'{member.value}'" for member in kind)
        listed = f"!has({entry}.values) && (!has({entry}.options) || {entry}.options.all(v, v in [{names}]))"
        span = "false"
    elif kind in (int, float):
        whole = " && v == double(int(v))" if kind is int else ""
        listed = (
            f"!has({entry}.options) && (!has({entry}.values) || {entry}.values.all(v, {_bounds(field, 'v')}{whole}))"
        )
        top = f"({entry}.type == 'randint' ? {entry}.high - 1.0 : {entry}.high)"
        span = f"{_bounds(field, f'{entry}.low')} && {_bounds(field, top)}"
        if kind is int:  # Tune samples floats from uniform and loguniform
            span = f"{entry}.type == 'randint' && {span}"
    else:
        return None
    # A parameter that is ill-formed in itself (low >= high, say) is the parameter's own rules' to report.
    ill_formed = (
        f"!has({entry}.low) || !has({entry}.high) || {entry}.low >= {entry}.high"
        f" || ({entry}.type == 'loguniform' && {entry}.low <= 0.0)"
        f" || ({entry}.type == 'randint' && ({entry}.low != double(int({entry}.low))"
        f" || {entry}.high != double(int({entry}.high))))"
    )
    return f"self.all(k, k != '{key}' || ({entry}.type in ['choice', 'grid'] ? ({listed}) : {ill_formed} || ({span})))"


def _field(model: type[ContractModel], alias: str) -> FieldInfo:
    return next(field for name, field in model.model_fields.items() if (field.alias or name) == alias)


def _typed(key: str, parameter: SearchParameter, field: FieldInfo) -> SearchParameter:
    """The parameter with the kind of list its setting takes: options for names, whole numbers for counts."""
    kind = _kind(field)
    named = kind is not None and issubclass(kind, StrEnum)
    if named and (parameter.values is not None or parameter.type not in DISCRETE_TYPES):
        raise ValueError(f"space.{key}: a named setting takes choice or grid with options, not numbers")
    if not named and parameter.options is not None:
        raise ValueError(f"space.{key}: a numeric setting takes values (numbers), not options")
    if kind is int and parameter.values is not None:
        if not all(float(v).is_integer() for v in parameter.values):
            raise ValueError(f"space.{key}: values must be whole numbers")
        return parameter.model_copy(update={"values": [int(v) for v in parameter.values]})
    if kind is int and parameter.type in (ParameterType.UNIFORM, ParameterType.LOGUNIFORM):
        raise ValueError(
            f"space.{key}: a whole-number setting takes randint, choice or grid, not {parameter.type.value}"
        )
    return parameter


def _values_rules() -> list[dict[str, Any]]:
    rules = []
    for key, (model, alias) in searchable_parameters().items():
        rule = _values_rule(key, _field(model, alias))
        if rule is not None:
            field_path = f".{key}" if "." not in key else f"['{key}']"
            message = f"a value searched for {key} is not one {key} takes (type or range)"
            rules.append(cel_rule(rule, message, field_path))
    return rules


class SearchSpec(ContractModel):
    """Hyperparameter search with Ray Tune. Each trial is a full training run."""

    model_config = with_cel(
        cel_rule(
            "self.algorithm != 'grid' || self.space.all(k, self.space[k].type in ['grid', 'choice'])",
            "algorithm grid needs every parameter to be grid or choice",
            ".space",
        ),
        cel_rule(
            "self.algorithm != 'tpe' || self.space.all(k, self.space[k].type != 'grid')",
            "algorithm tpe cannot take grid parameters; use choice",
            ".space",
        ),
        cel_rule("!has(self.asha) || self.scheduler == 'asha'", "asha options need scheduler asha", ".asha"),
        cel_rule(
            "!has(self.mode) || !has(self.metric) || self.mode == (self.metric in ["
            + ", ".join(f"'{metric.value}'" for metric, mode in METRIC_MODE.items() if mode == Mode.MIN)
            + "] ? 'min' : 'max')",
            "mode contradicts the metric's direction (accuracy and f1: max; loss and perplexity: min)",
            ".mode",
        ),
    )

    metric: Metric | None = Field(
        default=None,
        description=(
            "Validation metric that ranks trials: accuracy, f1 (classification), loss or perplexity. "
            "Defaults to accuracy for classification and loss for causal-lm."
        ),
    )
    mode: Mode | None = Field(
        default=None, description="max or min; follows the metric when omitted, and must agree with it."
    )
    space: dict[str, SearchParameter] = Field(
        min_length=1,
        max_length=32,
        description=(
            "Searched settings by name: any hyperparameter (e.g. learningRate, batchSize) or "
            "lora.rank, lora.alpha, lora.dropout, freeze.trainableLayers."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                cel_rule(_searchable_keys_rule(), "unknown search parameter; see the field description for the names"),
                *_values_rules(),
            ]
        },
    )
    algorithm: Algorithm = Field(
        default=Algorithm.RANDOM, description="random, grid (every combination) or tpe (Optuna)."
    )
    scheduler: Scheduler = Field(default=Scheduler.NONE, description="none, or asha to stop weak trials early.")
    asha: AshaOptions | None = Field(default=None, description="ASHA options (scheduler asha).")
    trials: int | None = Field(
        default=None,
        ge=1,
        le=10000,
        description=("Trials to run (default 4). With algorithm grid: passes over the whole grid (default 1)."),
    )
    max_concurrent_trials: int = Field(
        default=2, ge=1, le=1000, description="Trials running at once; also bounded by the cluster's capacity."
    )

    @model_validator(mode="after")
    def _space_is_consistent(self) -> SearchSpec:
        known = searchable_parameters()
        for key, parameter in self.space.items():
            if key not in known:
                raise ValueError(f"space: unknown parameter {key!r}; searchable: {', '.join(known)}")
            model, alias = known[key]
            self.space[key] = parameter = _typed(key, parameter, _field(model, alias))
            for value in parameter.candidate_values():
                if value == AUTO:
                    raise ValueError(f"space.{key}: auto is not a search candidate; search concrete values")
                try:  # as JSON, strictly: as the API server sees the value ("3" is not 3)
                    model.model_validate_json(json.dumps({alias: value}), strict=True)
                except ValidationError as error:
                    reason = error.errors()[0]["msg"]
                    raise ValueError(f"space.{key}: value {value!r} is invalid: {reason}") from None
            if self.algorithm == Algorithm.GRID and parameter.type not in DISCRETE_TYPES:
                raise ValueError(f"space.{key}: algorithm grid needs grid or choice, not {parameter.type.value}")
            if self.algorithm == Algorithm.TPE and parameter.type == ParameterType.GRID:
                raise ValueError(f"space.{key}: algorithm tpe cannot take grid parameters; use choice")
        if self.metric is not None and self.mode is not None and METRIC_MODE[self.metric] != self.mode:
            raise ValueError(
                f"mode {self.mode.value} contradicts metric {self.metric.value}, "
                f"which improves towards {METRIC_MODE[self.metric].value}"
            )
        if self.asha is not None and self.scheduler != Scheduler.ASHA:
            raise ValueError("asha is set but scheduler is not asha")
        return self

    @property
    def effective_trials(self) -> int:
        if self.trials is not None:
            return self.trials
        return 1 if self.algorithm == Algorithm.GRID else 4
