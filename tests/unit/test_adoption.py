"""Adopting an object found under a run's name: only the one kubetune would create, owned by the job by kind,
name and UID (a planted copy that carries the job's UID is not adopted)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from kubetune.operator.api.finetunejob import FineTuneJob, Trigger
from kubetune.operator.api.manifests import parse
from kubetune.operator.builders.finetunejob import build_run
from kubetune.operator.planning.adoption import adoption_problem
from kubetune.operator.planning.finetunejob import RunRequest
from kubetune.operator.settings import Settings

from ..conftest import mutated

Manifest = dict[str, Any]


def run_objects(document: Manifest) -> dict[str, Manifest]:
    job = parse(mutated(mutated(document, "metadata.namespace", "ml"), "metadata.uid", "uid-1"))
    assert isinstance(job, FineTuneJob)
    request = RunRequest(number=2, trigger=Trigger.SPEC_CHANGE, trigger_detail="", spec_generation=1, trigger_hash="h")
    manifests = build_run(job, request, Settings())
    return {
        "config": manifests.config,
        "report": manifests.report,
        "role": manifests.role,
        "binding": manifests.role_binding,
        "account": manifests.service_account,
        "policy": manifests.network_policy,
        "run": manifests.ray_job,
    }


def as_stored(manifest: Manifest) -> Manifest:
    """The object as the API server returns it: server fields and defaults added."""
    stored = copy.deepcopy(manifest)
    stored["metadata"] |= {"uid": "child-uid", "resourceVersion": "7", "creationTimestamp": "2026-12-06T12:00:00Z"}
    stored["metadata"]["annotations"] = {**stored["metadata"].get("annotations", {}), "added-by": "someone"}
    if stored["kind"] == "NetworkPolicy":
        stored["spec"].setdefault("policyTypes", ["Ingress"])
    if stored["kind"] == "RoleBinding":
        stored["subjects"][0].setdefault("apiGroup", "")
    if stored["kind"] == "RayJob":
        stored["spec"]["suspend"] = False  # Kueue admitted it
        stored["status"] = {"jobStatus": "RUNNING"}
    return stored


def edit(name: str, path: str, value: Any) -> tuple[str, tuple[str | int, ...], Any]:
    """A change of object `name` at the dotted `path` (a digit addresses a list item, brackets a dotted key)."""
    parts = re.findall(r"\[([^\]]+)\]|([^.]+)", path)
    return name, tuple(int(plain) if plain.isdigit() else (bracketed or plain) for bracketed, plain in parts), value


def changed(document: Manifest, path: tuple[str | int, ...], value: Any) -> Manifest:
    result = copy.deepcopy(document)
    node: Any = result
    for part in path[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[path[-1]] = value
    return result


@pytest.mark.parametrize("name", ["config", "report", "role", "binding", "account", "policy", "run"])
def test_what_an_earlier_pass_created_is_adopted(minimal_job: Manifest, name: str) -> None:
    desired = run_objects(minimal_job)[name]
    assert adoption_problem(as_stored(desired), desired) is None


PLANTED = [
    # L1 of the 2026-12-06 review: a run config with the victim's UID, holding the attacker's run.json.
    (edit("config", "data.[run.json]", '{"schemaVersion": 1}'), "data"),
    (edit("config", "data.[extra.py]", "print(1)"), "data"),
    (edit("config", "binaryData", {"run.json": "e30="}), "binaryData"),
    (edit("report", "data.[report.json]", '{"stage": "done"}'), "data"),
    (edit("role", "rules.0.verbs", ["get", "patch", "update"]), "rules.0.verbs"),
    (edit("role", "rules.0.resourceNames", ["support-tickets-r2-config"]), "rules.0.resourceNames.0"),
    (edit("binding", "subjects.0.name", "default"), "subjects.0.name"),
    (edit("run", "spec.entrypoint", "python -c 'import os'"), "spec.entrypoint"),
    (edit("run", "metadata.labels.[kubetune.io/run]", "7"), "metadata.labels.kubetune.io/run"),
    (edit("policy", "spec.ingress", []), "spec.ingress"),
    (edit("config", "metadata.ownerReferences.0.kind", "ModelDeployment"), "controller's kind"),
    (edit("config", "metadata.ownerReferences.0.name", "another-job"), "controller's name"),
    (edit("config", "metadata.ownerReferences.0.uid", "uid-2"), "controller's uid"),
    (edit("config", "metadata.ownerReferences.0.apiVersion", "example.com/v1alpha1"), "controller's API group"),
    (edit("config", "metadata.ownerReferences.0.controller", False), "no controller"),
]


@pytest.mark.parametrize(("change", "named"), PLANTED, ids=[f"{c[0]}-{'.'.join(map(str, c[1]))}" for c, _ in PLANTED])
def test_a_planted_object_is_not_adopted(
    minimal_job: Manifest, change: tuple[str, tuple[str | int, ...], Any], named: str
) -> None:
    name, path, value = change
    desired = run_objects(minimal_job)[name]
    planted = changed(as_stored(desired), path, value)
    problem = adoption_problem(planted, desired)
    assert problem is not None and named in problem
    assert str(value) not in problem or named in str(value)  # the field is named, its value is not echoed
