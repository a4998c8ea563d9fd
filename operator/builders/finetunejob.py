"""FineTuneJob run → the objects of one run: RayJob, run config, report object and its RBAC.

Pure: no I/O, no clock, no kopf. The same inputs always give the same manifests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubetune.operator.api.common import API_VERSION
from kubetune.operator.api.finetunejob import KIND, FineTuneJob
from kubetune.operator.builders import pods
from kubetune.operator.images import CONFIG_MOUNT_PATH
from kubetune.operator.naming import (
    GENERATION_ANNOTATION,
    KUEUE_QUEUE_LABEL,
    REPORT_LABEL,
    SPEC_HASH_ANNOTATION,
    TRIGGER_ANNOTATION,
    TRIGGER_DETAIL_ANNOTATION,
    config_map_name,
    controller_reference,
    plan_job_name,
    report_name,
    run_labels,
    run_name,
    run_output_uri,
    runner_name,
)
from kubetune.operator.planning.finetunejob import RunRequest
from kubetune.operator.planning.gpu_plans import plans_first
from kubetune.operator.settings import Settings
from kubetune.runtime.contract import RunSpec
from kubetune.runtime.contract.report import REPORT_KEY
from kubetune.runtime.contract.runconfig import RunConfig, RunIdentity, WorkerResources

Manifest = dict[str, Any]
ENTRYPOINT_MODULE = "kubetune.runtime.recipe.finetune"
PLAN_MODULE = "kubetune.runtime.recipe.plan"
# The plan reads config.json and, for maxSequenceLength auto, tokenizes the training split: minutes at most.
# Two more tries cover a node that went away; a plan that cannot reach the hub or storage fails the run.
PLAN_BACKOFF_LIMIT, PLAN_DEADLINE_SECONDS = 2, 3600
CONFIG_KEY = "run.json"
# `ray job submit` submits the entry point, then only waits for the job and streams its logs: it requests
# little CPU, so that a small node keeps its cores for the Ray pods. Its start-up costs about 2.5 s of CPU
# (`ray job submit --help`, Ray 2.60), so the limit lets it burst to one core while it starts: measured
# under a CFS quota, it starts in about 4 s at a limit of 1 CPU, 6 s at 500m, 11 s at 250m and 25 s at
# 100m. The limit reserves nothing (only the request counts when the pod is scheduled), and no spec
# field sizes it: nothing in a run makes the submitter's work grow.
SUBMITTER_CPU_REQUEST, SUBMITTER_CPU_LIMIT, SUBMITTER_MEMORY = "100m", "1", "512Mi"


@dataclass(frozen=True)
class RunManifests:
    """Every object of one run, in the order they are applied."""

    service_account: Manifest
    role: Manifest
    role_binding: Manifest
    report: Manifest
    config: Manifest
    network_policy: Manifest
    ray_job: Manifest
    # A GPU run's plan Job: created in the RayJob's place, which waits for the plan (see planning/).
    plan_job: Manifest | None = None

    def in_order(self) -> list[Manifest]:
        """What starts the run, in order: its RayJob last, or its plan Job when it is planned first."""
        return [
            self.service_account,
            self.role,
            self.role_binding,
            self.report,
            self.config,
            self.network_policy,
            self.plan_job if self.plan_job is not None else self.ray_job,
        ]


def _metadata(job: FineTuneJob, name: str, request: RunRequest, **extra: Any) -> Manifest:
    return {
        "name": name,
        "namespace": job.metadata["namespace"],
        "labels": run_labels(job.metadata["name"], request.number),
        "ownerReferences": [controller_reference(API_VERSION, KIND, job.metadata)],
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


def read_only_claims(job: FineTuneJob) -> frozenset[str]:
    """The run's claims that hold only its inputs (model, data): every claim but the output's."""
    return frozenset(pvc_claims(job)) - frozenset(pods.pvc_claims([job.spec.output.uri]))


def _ray_pod(
    job: FineTuneJob, request: RunRequest, settings: Settings, service_account: str, *, head: bool, config: str
) -> pods.RayPod:
    """The head (runs the driver, mounts the run config, reports with the run's token) or a worker (trains)."""
    env, env_from = pods.storage_environment(job.spec.storage)
    resources = job.spec.resources
    common: dict[str, Any] = {
        "placement": resources,
        "labels": run_labels(job.metadata["name"], request.number),
        "service_account": service_account,
        "env_from": env_from,
        "claims": pvc_claims(job),
        "read_only_claims": read_only_claims(job),
        # The head too: its Ray Train controller records the workers' preemption checkpoint.
        "termination_grace_seconds": resources.termination_grace_seconds,
    }
    # The driver on the head reads the runtime settings and hands them to the workers.
    notice = {"name": pods.PREEMPTION_NOTICE_VARIABLE, "value": pods.PREEMPTION_NOTICE_PATH}
    if not head:
        return pods.RayPod(
            container="ray-worker",
            cpu=resources.cpu_per_worker,
            cpu_limit=resources.cpu_limit_per_worker,
            memory=resources.memory_per_worker,
            ephemeral_storage=resources.ephemeral_storage_per_worker,
            gpus=resources.gpus_per_worker,
            env=[notice, *env],
            pre_stop=pods.stop_hook(resources.termination_grace_seconds),
            **common,
        )
    return pods.RayPod(
        container="ray-head",
        cpu=resources.head.cpu,
        cpu_limit=resources.head.cpu_limit,
        memory=resources.head.memory,
        ephemeral_storage=resources.head.ephemeral_storage,
        gpus=0,
        nodes=resources.head,
        mount_token=True,
        env=[{"name": "KUBETUNE_RUN_CONFIG", "value": f"{CONFIG_MOUNT_PATH}/{CONFIG_KEY}"}, notice, *env],
        mounts=[{"name": "run-config", "mountPath": CONFIG_MOUNT_PATH, "readOnly": True}],
        pre_stop=pods.stop_hook(resources.termination_grace_seconds, worker=False),
        volumes=[{"name": "run-config", "configMap": {"name": config}}],
        **common,
    )


def _submitter_template(job: FineTuneJob, request: RunRequest, settings: Settings) -> Manifest:
    """The pod that submits the entry point (`ray job submit`): placed like the head, pulled like the Ray pods."""
    resources = job.spec.resources
    volumes, mounts, env = pods.writable_volumes()
    spec: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pods.pod_security(),
        "containers": [
            {
                "name": "ray-job-submitter",
                "image": pods.image_of(resources, settings)[0],
                "resources": {
                    "requests": {"cpu": SUBMITTER_CPU_REQUEST, "memory": SUBMITTER_MEMORY},
                    "limits": {"cpu": SUBMITTER_CPU_LIMIT, "memory": SUBMITTER_MEMORY},
                },
                "env": env,
                "securityContext": pods.container_security(),
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
        **pods.placement(resources.head, resources.priority_class_name, None, 0),
    }
    secrets = pods.pull_secrets(resources, settings)
    if secrets:
        spec["imagePullSecrets"] = secrets
    return {"metadata": {"labels": run_labels(job.metadata["name"], request.number)}, "spec": spec}


def _ray_cluster_spec(
    job: FineTuneJob, request: RunRequest, settings: Settings, service_account: str, config: str
) -> Manifest:
    resources = job.spec.resources
    head = _ray_pod(job, request, settings, service_account, head=True, config=config).template(settings)
    worker = _ray_pod(job, request, settings, service_account, head=False, config=config).template(settings)
    worker_params = {"num-gpus": str(resources.gpus_per_worker)} if resources.gpus_per_worker else {}
    cluster: Manifest = {
        "rayVersion": pods.image_of(resources, settings)[1],
        # The head runs the driver only: training, evaluation and compression run on the workers.
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
    return {**cluster, **pods.auth_options(settings)}


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
    workers = WorkerResources(
        workers=resources.workers,
        gpus_per_worker=resources.gpus_per_worker,
        sharding=resources.sharding,
        gpu_type=resources.gpu_type,
    )
    contract = RunSpec.model_validate(job.spec.model_dump(include=set(RunSpec.model_fields)))
    output = contract.output.model_copy(update={"uri": run_output_uri(contract.output.uri, request.number)})
    contract = contract.model_copy(update={"output": output})
    return RunConfig(spec=contract, run=identity, resources=workers)


def build_run_network_policy(job: FineTuneJob, number: int, settings: Settings) -> Manifest:
    """The NetworkPolicy of run `number`: only the run's own pods (and KubeRay, and a metrics scraper
    when the settings name one) reach its Ray cluster. What it is depends on the run's number alone,
    so it can be asserted again on every pass while the run is active."""
    name, labels = run_name(job.metadata["name"], number), run_labels(job.metadata["name"], number)
    metadata = {
        "name": name,
        "namespace": job.metadata["namespace"],
        "labels": labels,
        "ownerReferences": [controller_reference(API_VERSION, KIND, job.metadata)],
    }
    return pods.network_policy(metadata, labels, settings)


def build_plan_job(job: FineTuneJob, request: RunRequest, settings: Settings) -> Manifest:
    """The CPU Job that plans a GPU run: the head's pod (image, storage access, run config, reporting token,
    CPU placement) running the plan entry point instead of Ray. It holds no GPU."""
    run = run_name(job.metadata["name"], request.number)
    template = _ray_pod(job, request, settings, runner_name(run), head=True, config=config_map_name(run)).template(
        settings
    )
    [container] = template["spec"]["containers"]
    container["name"] = "plan"
    container["command"] = ["python", "-m", PLAN_MODULE, "--config", f"{CONFIG_MOUNT_PATH}/{CONFIG_KEY}"]
    template["spec"]["restartPolicy"] = "Never"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, plan_job_name(run), request),
        "spec": {
            "backoffLimit": PLAN_BACKOFF_LIMIT,
            "activeDeadlineSeconds": PLAN_DEADLINE_SECONDS,
            "template": template,
        },
    }


def build_run(job: FineTuneJob, request: RunRequest, settings: Settings) -> RunManifests:
    """All objects of run `request.number` of `job`."""
    run = run_name(job.metadata["name"], request.number)
    runner, report, config = runner_name(run), report_name(run), config_map_name(run)
    annotations = {
        TRIGGER_ANNOTATION: request.trigger.value,
        TRIGGER_DETAIL_ANNOTATION: request.trigger_detail,
        GENERATION_ANNOTATION: str(request.spec_generation),
        SPEC_HASH_ANNOTATION: request.trigger_hash,
    }
    ray_metadata = _metadata(job, run, request, annotations=annotations)
    spec = job.spec
    ray_spec: Manifest = {
        "entrypoint": f"python -m {ENTRYPOINT_MODULE} --config {CONFIG_MOUNT_PATH}/{CONFIG_KEY}",
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": settings.finished_cluster_ttl_seconds,
        "backoffLimit": spec.backoff_limit,
        "activeDeadlineSeconds": spec.active_deadline_seconds or settings.default_active_deadline_seconds,
        "rayClusterSpec": _ray_cluster_spec(job, request, settings, runner, config),
        "submitterPodTemplate": _submitter_template(job, request, settings),
    }
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
                    "verbs": ["patch"],  # the reporter only patches (runtime/reporting/kube_reporter.py)
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
        network_policy=build_run_network_policy(job, request.number, settings),
        ray_job={"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": ray_metadata, "spec": ray_spec},
        plan_job=build_plan_job(job, request, settings) if plans_first(job) else None,
    )
