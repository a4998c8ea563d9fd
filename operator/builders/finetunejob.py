"""FineTuneJob run → the objects of one run: RayJob, run config, report object and its RBAC.

Pure: no I/O, no clock, no kopf. The same inputs always give the same manifests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubetune.operator.api.common import API_VERSION
from kubetune.operator.api.finetunejob import KIND, FineTuneJob, Trigger
from kubetune.operator.builders import pods
from kubetune.operator.naming import (
    GENERATION_ANNOTATION,
    KUEUE_QUEUE_LABEL,
    REPORT_LABEL,
    SPEC_HASH_ANNOTATION,
    TRIGGER_ANNOTATION,
    TRIGGER_DETAIL_ANNOTATION,
    config_map_name,
    report_name,
    run_labels,
    run_name,
    runner_name,
)
from kubetune.operator.settings import Settings
from kubetune.runtime.contract import RunSpec
from kubetune.runtime.contract.report import REPORT_KEY
from kubetune.runtime.contract.runconfig import RunConfig, RunIdentity, WorkerResources

Manifest = dict[str, Any]
ENTRYPOINT_MODULE = "kubetune.runtime.finetune"
CONFIG_KEY = "run.json"


@dataclass(frozen=True)
class RunRequest:
    """A run the operator decided to start."""

    number: int
    trigger: Trigger
    trigger_detail: str
    spec_generation: int
    spec_hash: str


@dataclass(frozen=True)
class RunManifests:
    """Every object of one run, in the order they are applied."""

    service_account: Manifest
    role: Manifest
    role_binding: Manifest
    report: Manifest
    config: Manifest
    ray_job: Manifest

    def in_order(self) -> list[Manifest]:
        return [self.service_account, self.role, self.role_binding, self.report, self.config, self.ray_job]


def owner_reference(job: FineTuneJob) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata["name"],
        "uid": job.metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FineTuneJob, name: str, request: RunRequest, **extra: Any) -> Manifest:
    return {
        "name": name,
        "namespace": job.metadata["namespace"],
        "labels": run_labels(job.metadata["name"], request.number),
        "ownerReferences": [owner_reference(job)],
        **extra,
    }


def _report_metadata(job: FineTuneJob, name: str, request: RunRequest) -> Manifest:
    metadata = _metadata(job, name, request)
    metadata["labels"] = {**metadata["labels"], REPORT_LABEL: "true"}
    return metadata


def pvc_claims(job: FineTuneJob) -> list[str]:
    """Claims named by pvc:// URIs anywhere in the run, each once, in order of appearance."""
    spec = job.spec
    return pods.pvc_claims([spec.model.uri, spec.data.train, spec.data.validation, spec.data.test, spec.output.uri])


def _pod_template(
    job: FineTuneJob, settings: Settings, *, container: str, cpu: str, memory: str, gpus: int, config: str | None
) -> Manifest:
    """A Ray pod; the head (the one given `config`) mounts the run config, workers get the GPUs."""
    env, env_from = pods.storage_environment(job.spec.storage)
    pod = pods.RayPod(
        container=container,
        cpu=cpu,
        memory=memory,
        gpus=gpus,
        placement=job.spec.resources,
        env=[{"name": "KUBETUNE_RUN_CONFIG", "value": f"{settings.config_mount_path}/{CONFIG_KEY}"}, *env],
        env_from=env_from,
        claims=pvc_claims(job),
        mounts=[{"name": "run-config", "mountPath": settings.config_mount_path, "readOnly": True}] if config else [],
        volumes=[{"name": "run-config", "configMap": {"name": config}}] if config else [],
    )
    return pod.template(settings)


def _ray_cluster_spec(job: FineTuneJob, settings: Settings, service_account: str, config: str) -> Manifest:
    resources = job.spec.resources
    head = _pod_template(
        job,
        settings,
        container="ray-head",
        cpu=resources.head.cpu,
        memory=resources.head.memory,
        gpus=0,
        config=config,
    )
    worker = _pod_template(
        job,
        settings,
        container="ray-worker",
        cpu=resources.cpu_per_worker,
        memory=resources.memory_per_worker,
        gpus=resources.gpus_per_worker,
        config=None,
    )
    for template in (head, worker):
        template["spec"]["serviceAccountName"] = service_account
    worker_params = {"num-gpus": str(resources.gpus_per_worker)} if resources.gpus_per_worker else {}
    return {
        "rayVersion": settings.ray_version,
        # The head coordinates; training runs on the workers only.
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": head},
        "workerGroupSpecs": [
            {
                "groupName": "workers",
                "replicas": resources.workers,
                "minReplicas": resources.workers,
                "maxReplicas": resources.workers,
                "rayStartParams": worker_params,
                "template": worker,
            }
        ],
    }


def run_config(job: FineTuneJob, request: RunRequest) -> RunConfig:
    """What the runtime reads: the run contract (without cluster fields), who it is, its workers."""
    name = job.metadata["name"]
    identity = RunIdentity(
        job_name=name,
        namespace=job.metadata["namespace"],
        run_number=request.number,
        run_name=run_name(name, request.number),
        report_config_map=report_name(run_name(name, request.number)),
    )
    resources = job.spec.resources
    workers = WorkerResources(workers=resources.workers, gpus_per_worker=resources.gpus_per_worker)
    contract = RunSpec.model_validate(job.spec.model_dump(include=set(RunSpec.model_fields)))
    return RunConfig(spec=contract, run=identity, resources=workers)


def build_run(job: FineTuneJob, request: RunRequest, settings: Settings) -> RunManifests:
    """All objects of run `request.number` of `job`."""
    run = run_name(job.metadata["name"], request.number)
    runner, report, config = runner_name(run), report_name(run), config_map_name(run)
    annotations = {
        TRIGGER_ANNOTATION: request.trigger.value,
        TRIGGER_DETAIL_ANNOTATION: request.trigger_detail,
        GENERATION_ANNOTATION: str(request.spec_generation),
        SPEC_HASH_ANNOTATION: request.spec_hash,
    }
    ray_metadata = _metadata(job, run, request, annotations=annotations)
    spec = job.spec
    ray_spec: Manifest = {
        "entrypoint": f"python -m {ENTRYPOINT_MODULE} --config {settings.config_mount_path}/{CONFIG_KEY}",
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": settings.finished_cluster_ttl_seconds,
        "backoffLimit": spec.backoff_limit,
        "rayClusterSpec": _ray_cluster_spec(job, settings, runner, config),
    }
    if spec.active_deadline_seconds is not None:
        ray_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.queue_name:
        ray_metadata["labels"][KUEUE_QUEUE_LABEL] = spec.queue_name
        ray_spec["suspend"] = True  # Kueue unsuspends the RayJob when it admits it.
    config_json = json.dumps(run_config(job, request).to_wire(), sort_keys=True, indent=2)
    return RunManifests(
        service_account={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(job, runner, request)},
        role={
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(job, runner, request),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": [report],
                    "verbs": ["get", "patch", "update"],
                },
            ],
        },
        role_binding={
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(job, runner, request),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": runner},
            "subjects": [{"kind": "ServiceAccount", "name": runner, "namespace": job.metadata["namespace"]}],
        },
        report={
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _report_metadata(job, report, request),
            "data": {REPORT_KEY: ""},
        },
        config={
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(job, config, request),
            "data": {CONFIG_KEY: config_json},
        },
        ray_job={"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": ray_metadata, "spec": ray_spec},
    )
