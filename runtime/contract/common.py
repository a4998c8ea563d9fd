"""Shared building blocks of the run contract: the base model, URIs, quantities.

Only pydantic and the standard library may be imported here: the operator embeds
these models in its CRDs and must not pull in the training stack.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

_STORAGE_ALTERNATIVES = (
    r"file://.+"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?"
)
# A repository on the Hugging Face Hub: <name> or <org>/<name>, as the hub spells them.
_HUB_REPOSITORY = r"[A-Za-z0-9][-A-Za-z0-9_.]*(/[-A-Za-z0-9_.]+)?"
# Where data from the Hub lives: hf://datasets/<org>/<name> (the hub's own spelling of a dataset repository).
HUB_DATASETS_PREFIX = "hf://datasets/"
# A storage location. Schemes: file://, pvc://<claim>/<path>, s3://<bucket>/<key>,
# hf://<org>/<name>, or a plain path (no scheme, no colon).
URI_PATTERN = rf"^({_STORAGE_ALTERNATIVES}|hf://{_HUB_REPOSITORY}|[^:]+)$"
# A data location: the same, except that the Hub's repositories are datasets, hf://datasets/<org>/<name>.
DATA_URI_PATTERN = rf"^({_STORAGE_ALTERNATIVES}|hf://datasets/{_HUB_REPOSITORY}|[^:]+)$"
URI_SCHEMES = ("file", "pvc", "s3", "hf")
_URI_RE = re.compile(URI_PATTERN)
_DATA_URI_RE = re.compile(DATA_URI_PATTERN)
URI_MAX_LENGTH = 2048


def _unsupported_scheme(value: str) -> None:
    scheme, sep, _ = value.partition("://")
    if sep and scheme not in URI_SCHEMES:
        raise ValueError(
            f"unsupported URI scheme {scheme!r} in {value!r}; use one of "
            + ", ".join(f"{s}://" for s in URI_SCHEMES)
            + " or a plain path"
        )


def _check_uri(value: str) -> str:
    if _URI_RE.fullmatch(value):
        return value
    _unsupported_scheme(value)
    if value.startswith(HUB_DATASETS_PREFIX):
        raise ValueError(f"{value!r} names a dataset on the Hugging Face Hub; a model there is hf://<org>/<name>")
    raise ValueError(
        f"malformed URI {value!r}: expected file://<path>, pvc://<claim>/<path>, "
        "s3://<bucket>/<key>, hf://<org>/<name> or a plain path"
    )


def _check_data_uri(value: str) -> str:
    if _DATA_URI_RE.fullmatch(value):
        return value
    _unsupported_scheme(value)
    if value.startswith("hf://") and not value.startswith(HUB_DATASETS_PREFIX):
        raise ValueError(
            f"{value!r} names a model on the Hugging Face Hub; a dataset there is hf://datasets/<org>/<name>"
        )
    raise ValueError(
        f"malformed URI {value!r}: expected file://<path>, pvc://<claim>/<path>, "
        "s3://<bucket>/<key>, hf://datasets/<org>/<name> or a plain path"
    )


Uri = Annotated[
    str,
    # The pattern goes to the CRD only; locally the validator gives a clearer message.
    Field(min_length=1, max_length=URI_MAX_LENGTH, json_schema_extra={"pattern": URI_PATTERN}),
    AfterValidator(_check_uri),
]
DataUri = Annotated[
    str,
    Field(min_length=1, max_length=URI_MAX_LENGTH, json_schema_extra={"pattern": DATA_URI_PATTERN}),
    AfterValidator(_check_data_uri),
]

# A Kubernetes resource quantity greater than zero (e.g. "500m", "2", "16Gi"); integers are accepted too.
# Everything kubetune requests (CPU, memory) must be positive: "0" or "-2" would schedule nothing useful.
QUANTITY_PATTERN = (
    r"^\+?(([0-9]*[1-9][0-9]*(\.[0-9]*)?)|([0-9]*\.[0-9]*[1-9][0-9]*))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def _check_quantity(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a resource quantity such as '2', '500m' or '16Gi', got {value!r}")
    text = str(value)
    if not _QUANTITY_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a positive resource quantity (e.g. '2', '500m', '16Gi')")
    return text


_QUANTITY_PARTS = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_QUANTITY_UNITS = {
    "": 1.0, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def quantity_value(value: str | int) -> float:
    """A Kubernetes quantity as a number ("500m" → 0.5, "2Gi" → 2147483648)."""
    match = _QUANTITY_PARTS.match(str(value))
    if match is None or match.group(2) not in _QUANTITY_UNITS:
        raise ValueError(f"{value!r} is not a resource quantity")
    return float(match.group(1)) * _QUANTITY_UNITS[match.group(2)]


def cpu_limit_rule(request: str, limit: str) -> dict[str, Any]:
    """The CEL rule (Kubernetes' quantity library) that a CPU limit field is at least its request field."""
    return cel_rule(
        f"!has(self.{limit}) || quantity(string(self.{limit})).compareTo(quantity(string(self.{request}))) >= 0",
        f"{limit} must be at least {request}",
        f".{limit}",
    )


def check_cpu_limit(request: str, limit: str | None, limit_field: str, request_field: str) -> None:
    """Raise when a CPU limit is below its request (the pydantic twin of cpu_limit_rule)."""
    if limit is not None and quantity_value(limit) < quantity_value(request):
        raise ValueError(f"{limit_field} must be at least {request_field}")


Quantity = Annotated[
    str,
    BeforeValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
            # The pattern applies to strings only: an integer must be positive too.
            "x-kubernetes-validations": [
                {"rule": "type(self) != int || self > 0", "message": "must be a positive resource quantity"}
            ],
        }
    ),
]

# Kubernetes object name (DNS-1123 subdomain label as used for most resources).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
KubernetesName = Annotated[str, Field(min_length=1, max_length=63, pattern=NAME_PATTERN)]


class ContractModel(BaseModel):
    """Base of every contract and API model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_enum_values=False,
        use_attribute_docstrings=False,
        # JSON has no NaN or infinity: the API server rejects them, so user specs never hold them.
        allow_inf_nan=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase JSON form, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# Longest message a status or report carries (runs, conditions, gate verdicts); longer ones are cut.
MESSAGE_MAX_LENGTH = 1024
# Longest short text (a reason, a name, a trigger detail) they carry.
SHORT_TEXT_MAX_LENGTH = 256
# Longest error text a report carries (the status shows its first MESSAGE_MAX_LENGTH characters).
ERROR_MAX_LENGTH = 8192


def _cut_to(limit: int) -> Callable[[Any], Any]:
    """A validator that cuts text longer than `limit` (ending it with "…") instead of refusing it."""

    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) > limit:
            return value[: limit - 1] + "…"
        return value

    return cut


# Text written between runtime and operator and into statuses: cut rather than refused, so that a long
# message (a driver log, say) never costs the rest of a report or a status write.
Message = Annotated[str, BeforeValidator(_cut_to(MESSAGE_MAX_LENGTH)), Field(max_length=MESSAGE_MAX_LENGTH)]
ShortText = Annotated[str, BeforeValidator(_cut_to(SHORT_TEXT_MAX_LENGTH)), Field(max_length=SHORT_TEXT_MAX_LENGTH)]
ErrorText = Annotated[str, BeforeValidator(_cut_to(ERROR_MAX_LENGTH)), Field(max_length=ERROR_MAX_LENGTH)]


def _finite_or_none(value: Any) -> Any:
    """NaN and infinities become None (JSON null), recursively; everything else is kept as it is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


# A measured number as written between runtime and operator: NaN and infinities (a diverged loss, say)
# become null, since JSON cannot carry them; a reader tells "not finite" (null) from "not reported" (absent).
FiniteOrNull = Annotated[float | None, BeforeValidator(_finite_or_none)]
Metrics = dict[str, FiniteOrNull]
# Free-form JSON values (hyperparameters, say), with any non-finite number inside made null.
JsonObject = Annotated[dict[str, Any], BeforeValidator(_finite_or_none)]


class WireModel(ContractModel):
    """Base of what one side writes and the other reads: the run config, the report, the status.

    Unknown fields are ignored rather than rejected, so that an operator and a runtime
    (or two operator versions) of different releases keep reading each other's output.
    User specs stay strict (`ContractModel`).
    """

    model_config = ConfigDict(extra="ignore")


def cel_rule(rule: str, message: str, field_path: str | None = None) -> dict[str, Any]:
    """One CRD `x-kubernetes-validations` entry (checked by the API server at admission)."""
    entry: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def with_cel(*rules: dict[str, Any]) -> ConfigDict:
    """Model config that attaches CEL rules to the model's CRD schema.

    Every rule mirrors a pydantic validator of the same model, so the local run and
    the API server reject the same specs.
    """
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})
