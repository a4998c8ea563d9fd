"""The spec cases the properties draw, their verdicts, and what the properties share: seed settings and counts.

Hypothesis draws the examples with a fixed seed (derandomized, no example database) and bounded counts, so every
run tries the same ones. The manifests start from the examples (and the unit tests' manifest of mistakes) and get
one or two mutations: from a catalogue of semantic mistakes with their intended verdict (spec_mutations), or drawn
from the CRD schema (schema_mutations). Each property writes its counts to
`<pytest basetemp>/kubetune-properties/*.json` and to `record_property`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from ..conftest import EXAMPLES, REPO_ROOT
from .schema_mutations import schema_mutations
from .spec_mutations import (
    CATALOGUE,
    DEPLOYMENT_MUTATIONS,
    JOB_MUTATIONS,
    FieldPath,
    Intent,
    Manifest,
    Mutation,
    with_edit,
)

RecordProperty = Callable[[str, object], None]

SPEC_EXAMPLES = 550  # generated manifests, on top of one per catalogue entry


SEED_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.generate),  # failures are collected and reported, not shrunk
)


# Where the counts go.


def write_counts(base: Path, name: str, counts: dict[str, Any], record_property: RecordProperty) -> Path:
    """The counts as JSON under pytest's base temp folder, and as properties of the test (JUnit XML)."""
    folder = base / "kubetune-properties"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    for key, value in counts.items():
        record_property(f"{name}.{key}", value)
    print(f"{name}: {json.dumps(counts, sort_keys=True)} ({path})")
    return path


# Manifests and the cases made of them.


@dataclass(frozen=True)
class Base:
    """A manifest the mutations start from."""

    name: str
    document: Manifest
    intent: Intent

    @property
    def kind(self) -> str:
        return str(self.document["kind"])


@dataclass(frozen=True)
class SpecCase:
    base: Base
    mutations: tuple[Mutation, ...]

    @property
    def document(self) -> Manifest:
        document = self.base.document
        for mutation in self.mutations:
            for path, value in mutation.edits:
                document = with_edit(document, path, value)
        return document

    @property
    def kind(self) -> str:
        return self.base.kind

    @property
    def intent(self) -> Intent:
        """What the manifest should get: a wrong-by-intent mutation makes it invalid, unless edits overlap."""
        paths = [[path for path, _ in mutation.edits] for mutation in self.mutations]
        for i, mine in enumerate(paths):
            for theirs in paths[i + 1 :]:
                if any(overlap(a, b) for a in mine for b in theirs):
                    return "unknown"
        intents = {mutation.intent for mutation in self.mutations}
        if "invalid" in intents or (self.base.intent == "invalid" and not self.mutations):
            return "invalid"
        if self.base.intent == "valid" and intents <= {"valid"}:
            return "valid"
        return "unknown"

    def describe(self) -> str:
        edits = "; ".join(f"[{m.label}] {m.describe()}" for m in self.mutations) or "(unchanged)"
        return f"{self.base.name}: {edits}"


def overlap(a: FieldPath, b: FieldPath) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


def for_the_cluster(document: dict[str, Any]) -> dict[str, Any]:
    """A local example as it would be applied to a cluster: its local output moved to a claim."""
    output = document["spec"]["output"]["uri"]
    return {
        **document,
        "spec": {**document["spec"], "output": {**document["spec"]["output"], "uri": f"pvc://runs/{output}"}},
    }


@cache
def bases() -> tuple[Base, ...]:
    """Every FineTuneJob and ModelDeployment of the examples (valid) and of the unit tests' mistakes (invalid)."""
    sources = [
        *((path, "valid") for path in sorted(EXAMPLES.glob("*.yaml"))),
        *((path, "valid") for path in sorted(EXAMPLES.glob("*/finetunejob.yaml"))),
        *((path, "invalid") for path in sorted((REPO_ROOT / "tests" / "unit" / "manifests").glob("*.yaml"))),
    ]
    found = []
    for path, intent in sources:
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(document, dict) and document.get("kind") in CATALOGUE:
                name = f"{path.relative_to(REPO_ROOT)}#{index + 1}"
                if path.parent != EXAMPLES and document["kind"] == "FineTuneJob":
                    document = for_the_cluster(document)
                found.append(Base(name, document, "valid" if intent == "valid" else "invalid"))
    return tuple(found)


def weighted_bases() -> tuple[Base, ...]:
    """The bases to draw from: the valid examples three times as often as the manifests of mistakes."""
    return tuple(base for base in bases() for _ in range(3 if base.intent == "valid" else 1))


def base_named(kind: str, stem: str) -> Base:
    return next(base for base in bases() if base.kind == kind and stem in base.name)


@st.composite
def spec_cases(draw: st.DrawFn) -> SpecCase:
    base = draw(st.sampled_from(weighted_bases()))
    pool = st.one_of(st.sampled_from(CATALOGUE[base.kind]), schema_mutations(base.kind))
    mutations = draw(st.lists(pool, min_size=1, max_size=2, unique_by=lambda m: m.label))
    return SpecCase(base, tuple(mutations))


def catalogue_cases() -> list[SpecCase]:
    """Every catalogue entry once, on the first example of its kind, and every base unchanged."""
    job, deployment = base_named("FineTuneJob", "complete"), base_named("ModelDeployment", "modeldeployment.yaml")
    cases = [SpecCase(base, ()) for base in bases()]
    cases += [SpecCase(job, (mutation,)) for mutation in JOB_MUTATIONS]
    cases += [SpecCase(deployment, (mutation,)) for mutation in DEPLOYMENT_MUTATIONS]
    minimal = base_named("FineTuneJob", "minimal")
    cases += [SpecCase(minimal, (mutation,)) for mutation in JOB_MUTATIONS if "name" not in mutation.label]
    return cases


# The two verdicts.


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    detail: str
    crashed: bool = False


@dataclass
class Judged:
    case: SpecCase
    local: Verdict
    server: Verdict
    minimal: SpecCase | None = None

    @property
    def agree(self) -> bool:
        return self.local.accepted == self.server.accepted and not self.local.crashed

    @property
    def direction(self) -> str:
        if self.local.crashed:
            return "kubetune validate crashed"
        if self.local.accepted:
            return "kubetune validate accepts, the API server refuses"
        return "kubetune validate refuses, the API server admits"

    def meets_intent(self) -> bool:
        intent = self.case.intent
        if intent == "unknown":
            return True
        wanted = intent == "valid"
        return self.local.accepted == wanted and self.server.accepted == wanted


def document_key(document: Manifest) -> str:
    return json.dumps(document, sort_keys=True, allow_nan=True)


@dataclass
class SpecVerdicts:
    judged: list[Judged] = field(default_factory=list)
    generated: int = 0
    duplicates: int = 0
    catalogued: int = 0

    def counts(self) -> dict[str, Any]:
        by_kind = Counter(j.case.kind for j in self.judged)
        intent = [j for j in self.judged if j.case.intent != "unknown"]
        return {
            "tried": len(self.judged),
            "catalogue_cases": self.catalogued,
            "generated_cases": self.generated,
            "generated_duplicates_skipped": self.duplicates,
            "finetunejobs": by_kind["FineTuneJob"],
            "modeldeployments": by_kind["ModelDeployment"],
            "accepted_by_both": sum(j.local.accepted and j.server.accepted for j in self.judged),
            "rejected_by_both": sum(not j.local.accepted and not j.server.accepted for j in self.judged),
            "disagreements": sum(not j.agree for j in self.judged),
            "validate_accepts_server_refuses": sum(j.local.accepted and not j.server.accepted for j in self.judged),
            "validate_refuses_server_admits": sum(
                not j.local.accepted and j.server.accepted and not j.local.crashed for j in self.judged
            ),
            "validate_crashes": sum(j.local.crashed for j in self.judged),
            "intent_checked": len(intent),
            "intent_violations": sum(not j.meets_intent() for j in intent),
        }
