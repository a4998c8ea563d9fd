"""Every problem of a manifest in one pass: field errors and cross-field rules together.

Pydantic stops at the first layer: a model's cross-field validator runs only when all of
its fields are valid, and stops at its first problem. The CRD's CEL rules (the admission
mirrors of those validators) have no such layers, so they are evaluated here as the API
server would: on the document with the schema's defaults applied and unknown fields pruned.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import celpy
from celpy import celtypes
from celpy.evaluation import CELEvalError, CELFunction
from kubetune.operator import crdgen
from kubetune.operator.api.common import API_VERSION, object_name_problem
from kubetune.operator.api.finetunejob import CLUSTER_OUTPUT_MESSAGE, FineTuneJob
from kubetune.operator.api.manifests import MODELS, Manifest, out_of_range_integers, validate_as_admitted
from kubetune.operator.policy import finetunejob_violations, modeldeployment_violations
from kubetune.operator.settings import Settings
from kubetune.runtime.contract.common import quantity_value
from kubetune.runtime.contract.errors import SpecError, describe, field_path
from pydantic import ValidationError

Location = tuple[int | str, ...]
Schema = Mapping[str, Any]


@dataclass(frozen=True)
class Problem:
    """One problem: the offending field's path and what is wrong with it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class RuleFailure:
    """A CEL rule that does not hold: `node` carries the rule, `path` adds the rule's fieldPath."""

    node: str
    path: str
    message: str
    field: str  # the rule's fieldPath without the leading dot; empty when the rule has none


def check(document: Any, *, local: bool = False, settings: Settings | None = None) -> Manifest:
    """The validated manifest, or a SpecError listing every problem, sorted by path.

    `local`: checked for `kubetune run` on this machine, where outputs may be local paths.
    `settings`: the operator's, when known: what they do not allow is a problem too.
    """
    problems = problems_of(document, local=local, settings=settings)
    if problems:
        raise SpecError([str(problem) for problem in problems])
    return validate_as_admitted(document["kind"], document)


def problems_of(document: Any, *, local: bool = False, settings: Settings | None = None) -> list[Problem]:
    """Header, field and cross-field problems of one manifest, de-duplicated and sorted by path.

    `local` leaves out what only a cluster run needs (an s3:// or pvc:// output). With the operator's
    `settings`, a manifest that is otherwise valid is also held to what they allow (policy.py).
    """
    if not isinstance(document, dict):
        return [Problem("(root)", f"expected a mapping, got {type(document).__name__}")]
    header = _header_problems(document)
    kind = document.get("kind")
    if kind not in MODELS:
        return header
    taken = {problem.path for problem in header}
    if "metadata.name" in taken:
        taken.add("metadata")  # the name's problem, as pydantic reports it on the metadata
    fields = [problem for problem in field_problems(document) if problem.path not in taken]
    failures = rule_failures(document)
    if local:
        failures = [failure for failure in failures if failure.message != CLUSTER_OUTPUT_MESSAGE]
    problems = set(header) | _merge(fields, failures)
    if settings is not None and not problems:
        problems |= set(policy_problems(document, settings))
    return sorted(problems, key=_order)


def policy_problems(document: dict[str, Any], settings: Settings) -> list[Problem]:
    """What the operator's settings do not allow in a valid manifest, as the operator reports it."""
    manifest = validate_as_admitted(document["kind"], document)
    if isinstance(manifest, FineTuneJob):
        found = finetunejob_violations(manifest.spec, settings)
    else:
        found = modeldeployment_violations(manifest.spec, settings)
    return [Problem(violation.path, violation.message) for violation in found]


def _header_problems(document: dict[str, Any]) -> list[Problem]:
    api_version, kind = document.get("apiVersion"), document.get("kind")
    problems = []
    if api_version != API_VERSION:
        problems.append(Problem("apiVersion", f"expected {API_VERSION}, got {api_version!r}"))
    if kind not in MODELS:
        problems.append(Problem("kind", f"expected one of {', '.join(MODELS)}, got {kind!r}"))
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    name_problem = object_name_problem(name)
    if name_problem is not None:
        problems.append(Problem("metadata.name", name_problem))
    return problems


def field_problems(document: dict[str, Any]) -> list[Problem]:
    """What pydantic reports (field errors, and the cross-field checks it gets to)."""
    too_large = [Problem(path, "must fit in a 64-bit integer") for path in out_of_range_integers(document)]
    if too_large:
        return too_large
    try:
        validate_as_admitted(document["kind"], document)
    except ValidationError as error:
        return [Problem(path, message) for path, _, message in (line.partition(": ") for line in describe(error))]
    return []


# CEL rules, as the API server runs them.


@cache
def schema_for(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of the kind's served version, as generated for the CRD."""
    info = next(info for info in crdgen.KINDS if info.kind == kind)
    versions = crdgen.crd_for(info)["spec"]["versions"]
    version = API_VERSION.rpartition("/")[2]
    served = [v for v in versions if v["served"]]
    chosen = next((v for v in served if v["name"] == version), served[0])
    schema: dict[str, Any] = chosen["schema"]["openAPIV3Schema"]
    return schema


def rule_failures(document: dict[str, Any]) -> list[RuleFailure]:
    """Every CEL rule of the kind's CRD schema that the defaulted document breaks."""
    schema = schema_for(document["kind"])
    return list(_walk(with_defaults(document, schema), schema, ()))


def with_defaults(value: Any, schema: Schema) -> Any:
    """Structural defaulting and pruning: nulls and unknown fields dropped, absent defaults filled."""
    if isinstance(value, dict) and (schema.get("type") == "object" or "properties" in schema):
        properties: Mapping[str, Schema] = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        result: dict[str, Any] = {}
        for key, child in value.items():
            if child is None and not schema.get("nullable"):
                continue
            if key in properties:
                result[key] = with_defaults(child, properties[key])
            elif isinstance(extra, dict):
                result[key] = with_defaults(child, extra)
            elif schema.get("x-kubernetes-preserve-unknown-fields"):
                result[key] = child
        for key, child_schema in properties.items():
            if key not in result and "default" in child_schema:
                result[key] = with_defaults(copy.deepcopy(child_schema["default"]), child_schema)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [with_defaults(item, schema["items"]) for item in value]
    return value


def _walk(value: Any, schema: Schema, location: Location) -> Iterator[RuleFailure]:
    kind = schema.get("type")
    if (kind == "object" and not isinstance(value, dict)) or (kind == "array" and not isinstance(value, list)):
        return  # the field error covers it
    rules = schema.get("x-kubernetes-validations", [])
    if rules:
        node = field_path(location)
        try:
            this = _cel(value, schema)
        except (TypeError, ValueError, OverflowError):
            this = None
        for rule in rules if this is not None else []:
            if _holds(rule["rule"], this) is False:
                relative = rule.get("fieldPath", "")
                path = field_path((*location, *_parts(relative))) if relative else node
                yield RuleFailure(node, path, rule["message"], relative.lstrip("."))
    if isinstance(value, dict):
        properties: Mapping[str, Schema] = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            child_schema = properties.get(key, extra if isinstance(extra, dict) else None)
            if child_schema is not None:
                yield from _walk(child, child_schema, (*location, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _walk(item, schema["items"], (*location, index))


def _cel(value: Any, schema: Schema) -> celtypes.Value:
    """A YAML value as a CEL value; `type: number` fields are doubles even when written as integers."""
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return celtypes.DoubleType(value) if schema.get("type") == "number" else celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, dict):
        properties: Mapping[str, Schema] = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        fallback: Schema = extra if isinstance(extra, dict) else {}
        return celtypes.MapType(
            {celtypes.StringType(str(k)): _cel(v, properties.get(str(k), fallback)) for k, v in value.items()}
        )
    if isinstance(value, list):
        items: Schema = schema.get("items", {})
        return celtypes.ListType([_cel(item, items) for item in value])
    if value is None:
        return None
    return celtypes.StringType(str(value))


def _quantity(text: celtypes.Value) -> celtypes.DoubleType:
    """Kubernetes' CEL `quantity()`, as a number (what the rules compare)."""
    return celtypes.DoubleType(quantity_value(str(text)))


def _compare_to(left: celtypes.DoubleType, right: celtypes.DoubleType) -> celtypes.IntType:
    """Kubernetes' `Quantity.compareTo`: -1, 0 or 1."""
    return celtypes.IntType((left > right) - (left < right))


# The functions of Kubernetes' CEL libraries that kubetune's rules use, beyond standard CEL.
KUBERNETES_FUNCTIONS: dict[str, CELFunction] = {"quantity": _quantity, "compareTo": _compare_to}


@cache
def _program(rule: str) -> celpy.Runner:
    environment = _environment()
    return environment.program(environment.compile(rule), functions=KUBERNETES_FUNCTIONS)


@cache
def _environment() -> celpy.Environment:
    return celpy.Environment()


def _holds(rule: str, this: celtypes.Value) -> bool | None:
    """Whether the rule holds for `self`; None when it cannot be evaluated (a field has the wrong type)."""
    try:
        result = _program(rule).evaluate({"self": this})
    except (CELEvalError, TypeError, ValueError, LookupError, ArithmeticError):
        return None
    return bool(result) if isinstance(result, celtypes.BoolType) else None


_FIELD_PATH_PART = re.compile(r"\.([^.\[\]]+)|\['([^']*)'\]|\[(\d+)\]")


def _parts(relative: str) -> Location:
    """`.search.metric` → ('search', 'metric'); `['a.b']` and `[0]` address keys and items."""
    parts: list[int | str] = []
    for match in _FIELD_PATH_PART.finditer(relative):
        name, key, index = match.groups()
        parts.append(int(index) if index is not None else (name if name is not None else key))
    return tuple(parts)


# Merging: a model validator's message and its CEL mirror are reported once.

# fmt: off
_STOP_WORDS = frozenset({
    "a", "an", "and", "are", "be", "but", "does", "every", "for", "got", "in", "is", "it", "must", "need", "needs",
    "not", "of", "on", "one", "only", "options", "or", "see", "set", "take", "takes", "the", "to", "type", "use",
    "valid", "with",
})
# fmt: on


def _words(message: str) -> set[str]:
    text = re.sub(r"'[^']*'|\d+(\.\d+)?", " ", message.lower().replace("-", ""))
    return {word for word in re.findall(r"[a-z][a-z0-9]*", text) if word not in _STOP_WORDS}


def _likeness(a: str, b: str) -> float:
    words_a, words_b = _words(a), _words(b)
    return len(words_a & words_b) / len(words_a | words_b) if words_a and words_b else 0.0


def _same_problem(problem: Problem, failure: RuleFailure) -> float:
    """How surely `problem` says what `failure` says (0 when they are about different nodes)."""
    if problem.path not in (failure.node, failure.path):
        return 0.0
    first = problem.message.split(";")[0], failure.message.split(";")[0]
    score = max(_likeness(problem.message, failure.message), _likeness(*first))
    if failure.field and re.search(rf"(?<![\w.]){re.escape(failure.field)}(?!\w)", problem.message):
        score += 0.15
    return score


def _merge(fields: list[Problem], failures: list[RuleFailure]) -> set[Problem]:
    """Field problems and rule failures; a model validator's twin keeps its message at the rule's path."""
    merged = {Problem(failure.path, failure.message) for failure in failures}
    for problem in fields:
        score, twin = max(((_same_problem(problem, f), f) for f in failures), default=(0.0, None), key=lambda p: p[0])
        if twin is not None and score >= 0.5:
            merged.discard(Problem(twin.path, twin.message))
            merged.add(Problem(twin.path, problem.message))
        else:
            merged.add(problem)
    return merged


def _order(problem: Problem) -> tuple[list[str], str]:
    return problem.path.replace("[", ".[").split("."), problem.message
