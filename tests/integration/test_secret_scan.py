"""Credentials stay in their Secret: a whole FineTuneJob run and the ModelDeployment that serves it, scanned.

The storage credentials Secret and the endpoint's token Secret hold unique marker values.
A run goes from creation to promotion (the test plays KubeRay, and the runtime's own
reporter writes the report with the markers in its environment), a ModelDeployment serves
it, and then every object in the namespace but the Secrets (found through discovery:
statuses, Events, ConfigMaps, RayJobs, RayServices, RBAC, whatever else is there), the
operator's log output, and the run's kubetune.json manifest (written by the runtime's
`write_manifest` with the markers in the environment) are searched for the markers, as
written and base64-encoded. Only references by name (secretRef, secretKeyRef, Secret volumes) may appear.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune.operator.kube import Kube
from kubetune.runtime.contract import RunConfig
from kubetune.runtime.contract.report import RunReport, Stage, VariantReport
from kubetune.runtime.reporting.base import TrainingProgress
from kubetune.runtime.reporting.kube_reporter import ConfigMapReporter
from kubetune.runtime.variants.export import ExportedVariant, ManifestInputs, VariantFormat, write_manifest

from .harness import EXAMPLE_RUNS, CapturedLogs, InProcessOperator, create_secret, set_ray_job_status
from .test_finetunejob_operator import SUCCEEDED, create_job, runner_api, wait_phase, wait_ray_job
from .test_modeldeployment_operator import create_deployment, phase, play_kuberay, ray_service

Manifest = dict[str, Any]
RUNNING = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}
# The Secrets the example ModelDeployment names; the job uses the same storage Secret.
STORAGE_SECRET = "training-storage"
TOKEN_SECRET = "support-tickets-endpoint"


def marker_values() -> dict[str, str]:
    """Environment variable → a value found nowhere else."""
    unique = uuid.uuid4().hex
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")
    return {name: f"kt-marker-{unique}-{name.lower().replace('_', '-')}" for name in names}


def leaks(text: str, secrets: list[str]) -> list[str]:
    """The secret values found in `text`, as written or base64-encoded."""
    found = []
    for value in secrets:
        encoded = base64.b64encode(value.encode()).decode()
        if value in text or encoded in text:
            found.append(value)
    return found


def namespaced_collections(kube: Kube, namespace: str) -> Iterator[str]:
    """The list path of every namespaced resource the API server serves (preferred versions), Secrets excepted."""
    versions = ["/api/v1"]
    for group in kube.request("GET", "/apis").get("groups", []):
        versions.append(f"/apis/{group['preferredVersion']['groupVersion']}")
    for version in versions:
        for resource in kube.request("GET", version).get("resources", []):
            listable = resource.get("namespaced") and "list" in resource.get("verbs", [])
            if listable and "/" not in resource["name"] and resource["name"] != "secrets":
                yield f"{version}/namespaces/{namespace}/{resource['name']}"


def everything_but_secrets(kube: Kube, namespace: str) -> dict[str, list[Manifest]]:
    found = {}
    for path in namespaced_collections(kube, namespace):
        items = kube.request("GET", path).get("items", [])
        if items:
            found[path.rsplit("/", 1)[1]] = items
    return found


def report_as_the_runtime_does(kube: Kube, namespace: str, run: str) -> None:
    """The runtime's ConfigMapReporter, with the run's own token, writes progress and the result."""
    reporter = ConfigMapReporter(runner_api(kube, namespace, run), f"{run}-report", namespace, min_interval_s=0)
    reporter.stage_started(Stage.TRAIN, "training on 1 worker")
    reporter.progress(TrainingProgress(step=20, total_steps=40, epoch=0.5, loss=0.9, learning_rate=1e-4))
    reporter.metrics("test-before", {"accuracy": 0.5}, step=0)
    variants = {
        name: VariantReport(uri=f"{EXAMPLE_RUNS}/1/variants/{name}", metrics={"accuracy": 0.86})
        for name in ("full", "merged", "int8")
    }
    reporter.result(
        RunReport(
            stage=Stage.DONE,
            metrics_before={"accuracy": 0.5},
            metrics_after={"accuracy": 0.87},
            variants=variants,
            best_variant="int8",
            manifest_uri=f"{EXAMPLE_RUNS}/1/kubetune.json",
            spec_digest="0" * 64,
            step=40,
        )
    )


def manifest_as_the_runtime_writes_it(run_config: RunConfig, root: Path) -> str:
    """kubetune.json for the run's config, from the runtime's `write_manifest` (no training needed)."""
    spec = run_config.spec
    variants = [
        ExportedVariant("full", root / "variants" / "full", VariantFormat.PEFT_ADAPTER, {"accuracy": 0.87}),
        ExportedVariant("int8", root / "variants" / "int8", VariantFormat.TORCHAO, {"accuracy": 0.86}),
    ]
    for variant in variants:
        variant.folder.mkdir(parents=True)
    inputs = ManifestInputs(
        spec=spec,
        identity=run_config.run,
        data_sources={"train": spec.data.train, "validation": "split", "test": "split"},
        labels=["billing", "bug"],
        metrics_before={"accuracy": 0.5},
        metrics_after={"accuracy": 0.87},
        validation={"accuracy": 0.85},
        training={"steps": 40, "workers": run_config.resources.workers},
        output_uri=spec.output.uri,
        best_variant="int8",
    )
    return write_manifest(root, inputs, variants).read_text()


def references(value: Any, key: str) -> list[Any]:
    """Every value under `key` anywhere in `value` (e.g. each secretKeyRef of a manifest)."""
    if isinstance(value, dict):
        return [*([value[key]] if key in value else []), *(r for v in value.values() for r in references(v, key))]
    if isinstance(value, list):
        return [r for item in value for r in references(item, key)]
    return []


def container_of(pod_template: Manifest) -> Manifest:
    container: Manifest = pod_template["spec"]["containers"][0]
    return container


def test_credentials_appear_nowhere_but_in_their_secret(
    kube: Kube, namespace: str, operator: InProcessOperator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    markers = marker_values()
    token = f"kt-marker-{uuid.uuid4().hex}-endpoint-token"
    secrets = [*markers.values(), token]
    create_secret(kube, namespace, STORAGE_SECRET, markers)
    create_secret(kube, namespace, TOKEN_SECRET, {"token": token})
    for name, value in markers.items():  # what the run's pods get from the Secret
        monkeypatch.setenv(name, value)

    levels = {"kubetune": logging.DEBUG, "kopf": logging.DEBUG}
    with CapturedLogs(levels) as logs:
        storage = {"credentialsSecret": {"name": STORAGE_SECRET}, "s3Endpoint": "http://minio.storage.svc:9000"}
        create_job(kube, namespace, name="tickets", spec__storage=storage)
        ray_job = wait_ray_job(kube, namespace, "tickets-r1")
        set_ray_job_status(kube, namespace, "tickets-r1", **RUNNING)
        report_as_the_runtime_does(kube, namespace, "tickets-r1")
        set_ray_job_status(kube, namespace, "tickets-r1", **SUCCEEDED)
        succeeded = wait_phase(kube, namespace, "Succeeded", run=1)
        create_deployment(kube, namespace)
        service = ray_service(kube, namespace)
        play_kuberay(kube, namespace, "RUNNING")
        phase(kube, namespace, "Ready")

    # The run got here: the report reached the status and the deployment serves the run.
    assert succeeded["runs"][-1]["artifacts"]["int8"] == f"{EXAMPLE_RUNS}/1/variants/int8"
    assert succeeded["promotedRun"] == 1
    # The credentials travel by reference, and only so.
    cluster = ray_job["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert {"secretRef": {"name": STORAGE_SECRET}} in container_of(template).get("envFrom", [])
    token_volumes = references(service, "secret")
    assert [(v["secretName"], v["items"]) for v in token_volumes] == [
        (TOKEN_SECRET, [{"key": "token", "path": "token"}])
    ]
    assert {"name": STORAGE_SECRET} in references(service, "secretRef")

    objects = everything_but_secrets(kube, namespace)
    for kind in ("finetunejobs", "modeldeployments", "rayjobs", "rayservices", "configmaps", "events"):
        assert kind in objects, f"no {kind} in {namespace}: the scan would prove nothing"
    found = {
        f"{kind}/{item['metadata']['name']}": hits
        for kind, items in objects.items()
        for item in items
        if (hits := leaks(json.dumps(item), secrets))
    }
    assert not found, f"Secret values copied into objects: {found}"

    log_text = "\n".join(logs.lines())
    assert log_text, "no operator log output was captured"
    assert not leaks(log_text, secrets), [line for line in logs.lines() if leaks(line, secrets)][:5]

    config_map = kube.get("v1", "ConfigMap", namespace, "tickets-r1-config")
    assert config_map is not None
    run_config = RunConfig.model_validate_json(config_map["data"]["run.json"])
    manifest = manifest_as_the_runtime_writes_it(run_config, tmp_path / "output")
    assert json.loads(manifest)["lineage"]["spec"]["data"]["train"] == run_config.spec.data.train
    assert not leaks(manifest, secrets), "kubetune.json holds a Secret value"
