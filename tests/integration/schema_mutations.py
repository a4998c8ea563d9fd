"""Mutations drawn from the CRD schema: wrong types, bounds, enums, patterns, unknown and removed fields.

Every field of a kind's served schema (crds/) is a spot; a drawn mutation sets one spot to a value picked for its
type, removes it (invalid by intent where its object requires it), or adds an unknown field to a closed object.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml
from hypothesis import strategies as st

from ..conftest import REPO_ROOT
from .spec_mutations import REMOVE, FieldPath, Mutation, dotted

Schema = dict[str, Any]


@dataclass(frozen=True)
class Spot:
    """A field of the schema: where it is, its schema, and whether its object requires it."""

    path: FieldPath
    schema: Schema
    required: bool


MAP_KEYS = {"space": "learningRate", "nodeSelector": "team"}


@cache
def crd_schema(kind: str) -> Schema:
    """The openAPIV3Schema of the kind's served version, as the API server has it (crds/)."""
    for path in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["served"])
            schema: Schema = version["schema"]["openAPIV3Schema"]
            return schema
    raise LookupError(kind)


def spots_of(schema: Schema, at: FieldPath) -> Iterator[Spot]:
    required = set(schema.get("required", []))
    for key, child in schema.get("properties", {}).items():
        yield Spot((*at, key), child, key in required)
        yield from spots_of(child, (*at, key))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and at:
        key = MAP_KEYS.get(str(at[-1]), "example")
        yield Spot((*at, key), extra, False)
        yield from spots_of(extra, (*at, key))
    items = schema.get("items")
    if isinstance(items, dict) and items.get("properties"):
        yield Spot((*at, 0), items, False)
        yield from spots_of(items, (*at, 0))


@cache
def spots(kind: str) -> tuple[Spot, ...]:
    return tuple(spots_of(crd_schema(kind)["properties"]["spec"], ("spec",)))


Labelled = tuple[str, Any]
WRONG_TYPES: dict[str, Labelled] = {
    "null": ("null", None),
    "boolean": ("a boolean", True),
    "string": ("a string", "x"),
    "integer": ("an integer", 7),
    "array": ("a list", ["x"]),
    "object": ("an object", {"x": 1}),
}
QUANTITIES: list[Labelled] = [
    ("quantity -2", "-2"),
    ("quantity 0", "0"),
    ("quantity abc", "abc"),
    ("quantity 1.5.2", "1.5.2"),
    ("quantity 16GB", "16GB"),
    ("quantity 500m", "500m"),
    ("quantity 2Gi", "2Gi"),
    ("quantity 1e3", "1e3"),
    ("quantity +1", "+1"),
    ("quantity integer 2", 2),
    ("quantity integer 0", 0),
    ("quantity integer -1", -1),
    ("quantity fraction 1.5", 1.5),
    ("quantity boolean", True),
    ("null", None),
]
TEXTS: list[Labelled] = [
    ("empty string", ""),
    ("string with a space", "a b"),
    ("capitals", "UPPER"),
    ("non-ASCII", "ünïcode"),
    ("leading digit", "1abc"),
    ("dot", "a.b"),
    ("slash", "a/b"),
    ("colon", "a:b"),
    ("trailing newline", "abc\n"),
    ("plain word", "abc"),
]


def wrong_types(*exempt: str) -> list[Labelled]:
    return [value for name, value in WRONG_TYPES.items() if name not in exempt]


def integer_values(schema: Schema) -> st.SearchStrategy[Labelled]:
    low, high = schema.get("minimum"), schema.get("maximum")
    fixed: list[Labelled] = [
        ("zero", 0),
        ("minus one", -1),
        ("2^63", 2**63),
        ("numeric string", "3"),
        ("fraction", 2.5),
        ("integral float", 3.0),
        *wrong_types("integer", "string"),
    ]
    if low is not None:
        fixed += [("below the minimum", low - 1), ("the minimum", low)]
    if high is not None:
        fixed += [("above the maximum", high + 1), ("the maximum", high)]
    in_range = st.integers(-1000 if low is None else low, 10**6 if high is None else high)
    return st.one_of(st.sampled_from(fixed), in_range.map(lambda v: ("in range", v)))


def number_values(schema: Schema) -> st.SearchStrategy[Labelled]:
    low, high = schema.get("minimum"), schema.get("maximum")
    fixed: list[Labelled] = [
        ("zero", 0.0),
        ("negative", -0.5),
        ("an integer", 1),
        ("numeric string", "0.1"),
        ("NaN", math.nan),
        ("infinity", math.inf),
        ("minus infinity", -math.inf),
        ("1e300", 1e300),
        ("1e-300", 1e-300),
        *wrong_types("integer", "string"),
    ]
    if low is not None:
        fixed += [("below the minimum", low - 0.5), ("the minimum", low), ("just above the minimum", low + 1e-9)]
    if high is not None:
        fixed += [("above the maximum", high + 0.5), ("the maximum", high), ("just below the maximum", high - 1e-9)]
    in_range = st.floats(
        -1e6 if low is None else low,
        1e6 if high is None else high,
        allow_nan=False,
        exclude_min=bool(schema.get("exclusiveMinimum")) and low is not None,
        exclude_max=bool(schema.get("exclusiveMaximum")) and high is not None,
    )
    return st.one_of(st.sampled_from(fixed), in_range.map(lambda v: ("in range", v)))


def string_values(schema: Schema) -> st.SearchStrategy[Labelled]:
    if "enum" in schema:
        known = [("a known value", value) for value in schema["enum"]]
        odd: list[Labelled] = [
            ("unknown value", "bogus"),
            ("capitalised value", str(schema["enum"][0]).upper()),
            ("empty string", ""),
        ]
        return st.sampled_from([*known, *odd, *wrong_types("string")])
    fixed = [*TEXTS, *wrong_types("string")]
    limit = schema.get("maxLength")
    if limit is not None:
        fixed += [("the longest", "a" * limit), ("one too long", "a" * (limit + 1))]
    drawn = st.text(max_size=12).map(lambda text: ("drawn text", text))
    return st.one_of(st.sampled_from(fixed), drawn)


def array_values(schema: Schema) -> st.SearchStrategy[Labelled]:
    fixed: list[Labelled] = [
        ("empty list", []),
        ("list of null", [None]),
        ("list of integers", [1]),
        ("list of strings", ["a"]),
        ("list of objects", [{"a": 1}]),
        *wrong_types("array"),
    ]
    limit = schema.get("maxItems")
    if limit is not None and (schema.get("items") or {}).get("type") == "string":
        fixed.append(("one item too many", [f"item{i}" for i in range(limit + 1)]))
    return st.sampled_from(fixed)


def values_for(schema: Schema) -> st.SearchStrategy[Labelled]:
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        return st.sampled_from(QUANTITIES)
    if kind == "integer":
        return integer_values(schema)
    if kind == "number":
        return number_values(schema)
    if kind == "string":
        return string_values(schema)
    if kind == "boolean":
        return st.sampled_from([("true", True), ("false", False), ("string true", "true"), ("one", 1), ("null", None)])
    if kind == "array":
        return array_values(schema)
    if kind == "object":
        return st.sampled_from([("empty object", {}), *wrong_types("object")])
    return st.sampled_from([("any integer", 1), ("any string", "x"), ("any list", [1]), ("null", None)])


def mutations_at(spot: Spot) -> st.SearchStrategy[Mutation]:
    kind = str(spot.schema.get("type", "any"))
    where = dotted(spot.path)
    changed = values_for(spot.schema).map(lambda lv: Mutation(f"{kind} {where}: {lv[0]}", ((spot.path, lv[1]),)))
    removed = Mutation(
        f"removed {'required ' if spot.required else ''}{where}",
        ((spot.path, REMOVE),),
        "invalid" if spot.required else "unknown",
    )
    options = [changed, st.just(removed)]
    closed = (
        kind == "object"
        and not spot.schema.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in spot.schema
    )
    if closed:
        options.append(st.just(Mutation(f"unknown field in {where}", (((*spot.path, "bogusField"), 1),), "invalid")))
    return st.one_of(options)


def schema_mutations(kind: str) -> st.SearchStrategy[Mutation]:
    return st.sampled_from(spots(kind)).flatmap(mutations_at)
