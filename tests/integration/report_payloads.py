"""What a run might write under report.json: valid reports and junk, as fixed payloads and as strategies.

The junk: non-finite numbers, huge strings, many entries, unknown fields, wrong types, deep nesting, invalid and
arbitrary JSON. The report property (test_report_payloads) writes each into a run's report ConfigMap.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from kubetune.runtime.contract.report import Stage

from .spec_mutations import Manifest, shown, with_edit


@dataclass(frozen=True)
class Payload:
    """What a run might write under report.json: a kind of junk, which part of it, and the text."""

    kind: str
    detail: str
    text: str

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.detail}"


def report_text(document: Any) -> str:
    return json.dumps(document, allow_nan=True)


def a_report(**fields: Any) -> Manifest:
    report: Manifest = {
        "schemaVersion": 1,
        "stage": "train",
        "step": 3,
        "totalSteps": 100,
        "epoch": 0.1,
        "loss": 1.5,
        "metricsBefore": {"accuracy": 0.4},
        "metricsAfter": {"accuracy": 0.7},
        "variants": {"int8": {"uri": "s3://out/int8", "metrics": {"accuracy": 0.69}, "latencyMsP50": 12.5}},
        "bestHyperparameters": {"learningRate": 0.001},
    }
    for dotted_path, value in fields.items():
        report = with_edit(report, tuple(dotted_path.split("__")), value)
    return report


NUMBER_FIELDS = [
    "loss",
    "epoch",
    "metricsAfter__accuracy",
    "metricsBefore__accuracy",
    "variants__int8__latencyMsP50",
    "variants__int8__metrics__accuracy",
    "bestHyperparameters__learningRate",
]
STRING_FIELDS = [
    "message",
    "error",
    "bestVariant",
    "manifestUri",
    "variants__int8__uri",
    "variants__int8__reason",
    "bestHyperparameters__note",
    "someFutureField",
]
HUGE_SIZES = [5_000, 70_000, 300_000, 900_000]
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
ANY_JSON = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
BROKEN_JSON = [
    "",
    "{",
    '{"stage": "train", "step": 5',
    "null",
    "[]",
    '"train"',
    "42",
    "NaN",
    "{'stage': 'train'}",
    '{"stage": "train"}}',
    "\u0000\u0001",
    '{"stage": "train", "step": 5,}',
]


def valid_reports() -> st.SearchStrategy[Payload]:
    reports = st.builds(
        a_report,
        stage=st.sampled_from([stage.value for stage in Stage]),
        step=st.integers(0, 10**6),
        loss=st.floats(-1e6, 1e6, allow_nan=False),
        message=st.text(max_size=200),
    )
    return reports.map(lambda r: Payload("valid report", f"stage {r['stage']}", report_text(r)))


def non_finite_reports() -> st.SearchStrategy[Payload]:
    def build(where: str, value: float) -> Payload:
        return Payload(
            "non-finite number", f"{where.replace('__', '.')} = {value}", report_text(a_report(**{where: value}))
        )

    return st.builds(build, st.sampled_from(NUMBER_FIELDS), st.sampled_from([math.nan, math.inf, -math.inf]))


def huge_reports() -> st.SearchStrategy[Payload]:
    def long_string(where: str, size: int) -> Payload:
        return Payload(
            "huge string",
            f"{where.replace('__', '.')} of {size} characters",
            report_text(a_report(**{where: "x" * size})),
        )

    def many_entries(where: str, count: int) -> Payload:
        entries: dict[str, Any] = {f"k{i:06d}": 0.5 for i in range(count)}
        if where == "variants":
            entries = {f"v{i:05d}": {"uri": f"s3://out/v{i}"} for i in range(count)}
        return Payload("many entries", f"{where} with {count} entries", report_text(a_report(**{where: entries})))

    strings = st.builds(long_string, st.sampled_from(STRING_FIELDS), st.sampled_from(HUGE_SIZES))
    entries = st.builds(
        many_entries,
        st.sampled_from(["metricsAfter", "metricsBefore", "variants", "bestHyperparameters"]),
        st.sampled_from([500, 5_000, 20_000]),
    )
    return st.one_of(strings, entries)


def odd_reports() -> st.SearchStrategy[Payload]:
    def unknown_fields(extra: dict[str, Any]) -> Payload:
        return Payload("unknown fields", ", ".join(sorted(extra))[:80] or "none", report_text({**a_report(), **extra}))

    def wrong_type(where: str, value: Any) -> Payload:
        report = a_report(**{where: value})
        return Payload("wrong type", f"{where.replace('__', '.')} = {shown(value, 40)}", report_text(report))

    def nested(depth: int) -> Payload:
        junk = '{"a":' * depth + "1" + "}" * depth
        text = report_text(a_report(bestHyperparameters={"deep": 0})).replace('{"deep": 0}', junk)
        return Payload("deeply nested", f"bestHyperparameters {depth} levels deep", text)

    unknown = st.dictionaries(st.text(min_size=1, max_size=12), ANY_JSON, min_size=1, max_size=4).map(unknown_fields)
    wrong = st.builds(
        wrong_type,
        st.sampled_from(
            ["stage", "step", "schemaVersion", "metricsAfter", "variants", "bestHyperparameters", "updatedAt"]
        ),
        st.sampled_from(["ten", -1, 2**70, [1, 2], {"x": "y"}, True, None, 1.5, "yesterday"]),
    )
    deep = st.builds(nested, st.sampled_from([10, 60, 150, 600, 5_000]))
    broken = st.sampled_from(BROKEN_JSON).map(lambda text: Payload("invalid JSON", repr(text)[:40], text))
    arbitrary = ANY_JSON.map(lambda value: Payload("arbitrary JSON", shown(value, 40), report_text(value)))
    return st.one_of(unknown, wrong, deep, broken, arbitrary)


def report_payloads() -> st.SearchStrategy[Payload]:
    return st.one_of(valid_reports(), non_finite_reports(), huge_reports(), odd_reports())


FIXED_PAYLOADS = [
    Payload("non-finite number", "loss = NaN", report_text(a_report(loss=math.nan))),
    Payload(
        "non-finite number", "metricsAfter.accuracy = Infinity", report_text(a_report(metricsAfter__accuracy=math.inf))
    ),
    Payload("non-finite number", "epoch = -Infinity", report_text(a_report(epoch=-math.inf))),
    Payload(
        "huge string",
        "bestHyperparameters.note of 300000 characters",
        report_text(a_report(bestHyperparameters__note="x" * 300_000)),
    ),
    Payload("huge string", "message of 900000 characters", report_text(a_report(message="x" * 900_000))),
    Payload(
        "many entries",
        "metricsAfter with 20000 entries",
        report_text(a_report(metricsAfter={f"m{i}": 0.5 for i in range(20_000)})),
    ),
    Payload("invalid JSON", "truncated", '{"stage": "train", "step": 5'),
    Payload("wrong type", "step = 'ten'", report_text(a_report(step="ten"))),
]
