"""Property over admitted specs, against the real API server and the in-process operator: no wedge.

Admitted manifests (from the session's `spec_verdicts`), created for real, each get a status with a condition
that carries a reason and the observed generation, and the operator logs no unhandled exception.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from kubetune.operator.api.common import API_VERSION
from kubetune.operator.kube import ApiError, Kube

from .harness import CapturedLogs, InProcessOperator, conditions, create_secret
from .spec_generation import RecordProperty, SpecCase, SpecVerdicts, write_counts
from .spec_judging import spec_verdicts
from .spec_mutations import Manifest, shown, with_edit

__all__ = ["spec_verdicts"]  # a fixture, used by name

NO_WEDGE_SAMPLE = 24  # admitted manifests created for real
NO_WEDGE_SECONDS = 30.0


SHORT_KINDS = {"FineTuneJob": "ftj", "ModelDeployment": "mdep"}


def wedge_candidates(verdicts: SpecVerdicts) -> list[SpecCase]:
    """Admitted manifests, the doubtful and wrong-by-intent ones first, one per mutation, then the rest."""
    admitted = [j.case for j in verdicts.judged if j.server.accepted and j.case.mutations]

    def priority(case: SpecCase) -> int:
        catalogued = [m for m in case.mutations if m.catalogued]
        if any(m.intent != "valid" for m in catalogued):
            return 0
        return 1 if catalogued else 2

    chosen: list[SpecCase] = []
    labels: set[str] = set()
    for case in sorted(admitted, key=priority):
        label = " + ".join(m.label for m in case.mutations)
        if label not in labels and len(chosen) < NO_WEDGE_SAMPLE:
            chosen.append(case)
            labels.add(label)
    return chosen


def named_for_creation(case: SpecCase, index: int, taken: set[tuple[str, str]]) -> Manifest | None:
    """The case's manifest with a name of its own (a mutated name is kept); None when that name is taken."""
    document = case.document
    renames = any(path == ("metadata", "name") for m in case.mutations for path, _ in m.edits)
    name = str(document["metadata"]["name"]) if renames else f"{SHORT_KINDS[case.kind]}-{index}"
    if (case.kind, name) in taken:
        return None
    taken.add((case.kind, name))
    return with_edit(document, ("metadata", "name"), name)


def create_the_examples_secrets(kube: Kube, namespace: str) -> None:
    """The Secrets the examples name, as a user would have them (the operator does not look at them)."""
    for name, data in (("training-storage", {"AWS_ACCESS_KEY_ID": "id"}), ("support-tickets-endpoint", {"token": "t"})):
        create_secret(kube, namespace, name, data)


def settled(body: Manifest | None) -> bool:
    """A status with a condition that has a reason and is computed for the object's generation."""
    if body is None:
        return False
    generation = body["metadata"].get("generation")
    return any(c.get("reason") and c.get("observedGeneration") == generation for c in conditions(body).values())


def test_admitted_manifests_never_wedge_the_operator(
    kube: Kube,
    namespace: str,
    operator: InProcessOperator,
    spec_verdicts: SpecVerdicts,
    tmp_path_factory: pytest.TempPathFactory,
    record_property: RecordProperty,
) -> None:
    created: list[tuple[SpecCase, Manifest]] = []
    refused: list[str] = []
    taken: set[tuple[str, str]] = set()
    create_the_examples_secrets(kube, namespace)
    with CapturedLogs({"kubetune": logging.INFO}) as logs:
        for index, case in enumerate(wedge_candidates(spec_verdicts)):
            document = named_for_creation(case, index, taken)
            if document is None:
                continue
            path = kube.collection_path(API_VERSION, case.kind, namespace)
            try:
                body = kube.request("POST", path, body=document, query={"fieldValidation": "Strict"})
            except ApiError as error:  # admitted in the dry run but not now: also worth knowing
                refused.append(f"{case.describe()}: {error}")
                continue
            created.append((case, body))
        deadline = time.monotonic() + NO_WEDGE_SECONDS
        waiting = list(created)
        while waiting and time.monotonic() < deadline:
            waiting = [(case, body) for case, body in waiting if not settled(current(kube, body))]
            time.sleep(0.5)
    counts: dict[str, Any] = {"created": len(created), "settled": len(created) - len(waiting)}
    counts |= {"wedged": len(waiting), "refused_on_create": len(refused)}
    counts["sample"] = [case.describe()[:200] for case, _ in created]
    write_counts(tmp_path_factory.getbasetemp(), "no-wedge", counts, record_property)
    assert len(created) >= NO_WEDGE_SAMPLE // 2
    problems = [f"{len(waiting)} of {len(created)} admitted objects had no reasoned status after {NO_WEDGE_SECONDS} s:"]
    for case, body in waiting:
        name = body["metadata"]["name"]
        problems.append(f"  - {case.kind} {name!r} ({case.describe()}): status {shown(status_of(kube, body), 300)}")
        mentions = [line.splitlines()[0] for line in logs.lines() if f"{namespace}/{name}" in line][-2:]
        problems += [f"      log: {line[:400]}" for line in mentions]
    unhandled = logs.unhandled(namespace)
    problems.append(f"{len(unhandled)} unhandled exceptions logged:")
    problems += [f"  - {line[:1500]}" for line in unhandled[:5]]
    assert not waiting and not unhandled and not refused, "\n".join(problems + refused)


def current(kube: Kube, body: Manifest) -> Manifest | None:
    meta = body["metadata"]
    return kube.get(API_VERSION, body["kind"], meta["namespace"], meta["name"])


def status_of(kube: Kube, body: Manifest) -> Any:
    return (current(kube, body) or {}).get("status")
