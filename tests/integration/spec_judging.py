"""The two verdicts on a manifest, and the session's judging of every spec case by both checkers.

`kubetune validate` (its checker, called directly) and the API server's admission (a server-side dry run with
strict field validation, as kubectl sends it) judge every catalogue case and SPEC_EXAMPLES generated ones. The
judging is done once a session and shared through the `spec_verdicts` fixture by the same-verdict and
intended-verdict properties (test_spec_verdicts) and the no-wedge property (test_no_wedge).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from kubetune.cli.validate import problems_of
from kubetune.operator.api.common import API_VERSION
from kubetune.operator.kube import ApiError, Kube

from .spec_generation import (
    SEED_SETTINGS,
    SPEC_EXAMPLES,
    Judged,
    SpecCase,
    SpecVerdicts,
    Verdict,
    catalogue_cases,
    document_key,
    spec_cases,
)
from .spec_mutations import Manifest

SPEC_VERDICTS = pytest.StashKey[SpecVerdicts]()


def local_verdict(document: Manifest) -> Verdict:
    """What `kubetune validate` says: no problems means accepted."""
    try:
        problems = problems_of(copy.deepcopy(document))
    except Exception as error:  # a crash of the checker is a finding, not a verdict
        return Verdict(False, f"{type(error).__name__}: {error}", crashed=True)
    return Verdict(not problems, "; ".join(str(problem) for problem in problems))


def server_verdict(kube: Kube, namespace: str, document: Manifest) -> Verdict:
    """What admission says: a server-side dry run (nothing is created) with kubectl's strict field validation."""
    path = kube.collection_path(API_VERSION, str(document.get("kind")), namespace)
    try:
        kube.request("POST", path, body=document, query={"dryRun": "All", "fieldValidation": "Strict"})
    except ApiError as error:
        if error.status in (400, 422):
            return Verdict(False, error.message)
        raise
    return Verdict(True, "")


def judge(kube: Kube, namespace: str, case: SpecCase) -> Judged:
    document = case.document
    return Judged(case, local_verdict(document), server_verdict(kube, namespace, document))


def smallest_disagreement(kube: Kube, namespace: str, judged: Judged) -> SpecCase | None:
    """A single mutation of the case that alone shows the same disagreement, if there is one."""
    if len(judged.case.mutations) < 2:
        return judged.case
    for mutation in judged.case.mutations:
        single = judge(kube, namespace, SpecCase(judged.case.base, (mutation,)))
        if not single.agree and single.direction == judged.direction:
            return single.case
    return None


@contextmanager
def dry_run_namespace(kube: Kube) -> Iterator[str]:
    """A namespace for the dry runs, deleted afterwards."""
    name = f"properties-dry-run-{uuid.uuid4().hex[:8]}"
    kube.request(
        "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    try:
        yield name
    finally:
        kube.request("DELETE", f"/api/v1/namespaces/{name}")


def judge_every_case(kube: Kube, namespace: str) -> SpecVerdicts:
    """Every catalogue case and SPEC_EXAMPLES generated ones, each judged by both checkers."""
    verdicts, seen = SpecVerdicts(), set()

    def add(case: SpecCase) -> bool:
        key = document_key(case.document)
        if key in seen:
            return False
        seen.add(key)
        verdicts.judged.append(judge(kube, namespace, case))
        return True

    for case in catalogue_cases():
        verdicts.catalogued += add(case)

    @settings(SEED_SETTINGS, max_examples=SPEC_EXAMPLES)
    @given(spec_cases())
    def judge_generated(case: SpecCase) -> None:
        if add(case):
            verdicts.generated += 1
        else:
            verdicts.duplicates += 1

    judge_generated()
    for judged in verdicts.judged:
        if not judged.agree:
            judged.minimal = smallest_disagreement(kube, namespace, judged)
    return verdicts


@pytest.fixture(scope="session")
def spec_verdicts(kube: Kube, pytestconfig: pytest.Config) -> SpecVerdicts:
    """Every spec case judged by both checkers, once a session for every module that uses it (kept in the stash)."""
    if SPEC_VERDICTS not in pytestconfig.stash:
        with dry_run_namespace(kube) as namespace:
            pytestconfig.stash[SPEC_VERDICTS] = judge_every_case(kube, namespace)
    return pytestconfig.stash[SPEC_VERDICTS]
