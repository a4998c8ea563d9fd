"""ModelDeployment → its RayService: a Ray cluster that autoscales, running kubetune's Serve application.

Pure: no I/O, no clock, no kopf. The Serve config names the application and its
arguments (the artifact being served among them), the deployment's autoscaling and
each replica's resources. Anything that changes the cluster makes KubeRay start a new
one beside the old and move the traffic once it serves (no downtime). A new artifact
changes the Serve config: with two replicas or more at rest, KubeRay updates the
application in place, and Serve replaces the replicas a few at a time while the
others answer; with one (or none), an in-place update would stop the only replica
before its successor starts, so the artifact is named in the replica pods too, which
makes it a new cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import yaml
from kubetune.operator.api.common import API_VERSION
from kubetune.operator.api.modeldeployment import KIND, ModelDeployment, ServedModel
from kubetune.operator.builders import pods
from kubetune.operator.naming import (
    APPLIED_HASH_ANNOTATION,
    ARTIFACT_ANNOTATION,
    DEPLOYMENT_LABEL,
    MANAGED_BY_LABEL,
    MANAGER,
    SERVE_APPLICATION,
    controller_reference,
    fit,
)
from kubetune.operator.settings import Settings
from kubetune.runtime.contract.common import quantity_value
from kubetune.runtime.contract.serving import (
    REPLICA_ENVIRONMENT,
    SERVE_ENVIRONMENT,
    SERVE_IMPORT_PATH,
    SERVE_LOGGING,
    ServeAppArgs,
    Variant,
)

Manifest = dict[str, Any]
DEPLOYMENT = "ModelServer"  # the Serve deployment's name (the class in kubetune.runtime.serving.app)
SERVE_PORT = 8000
# The endpoint's token reaches the replicas as a Secret volume (never an env var): kubelet updates
# the mounted file when the Secret changes, and the replicas re-read it, so a rotation needs no restart.
TOKEN_VOLUME = "endpoint-token"
TOKEN_MOUNT_PATH = "/var/run/secrets/kubetune.io/endpoint-token"
TOKEN_FILE = f"{TOKEN_MOUNT_PATH}/token"
# The autoscaler container's own ServiceAccount token (the head's Ray container has none).
AUTOSCALER_TOKEN_VOLUME = "autoscaler-token"


def ray_service_name(deployment: ModelDeployment) -> str:
    return fit(deployment.metadata["name"])


def endpoint(deployment: ModelDeployment) -> str:
    """The in-cluster URL clients use (KubeRay's Serve service of the RayService)."""
    service = f"{ray_service_name(deployment)}-serve-svc"
    return f"http://{service}.{deployment.metadata['namespace']}.svc:{SERVE_PORT}{deployment.spec.route_prefix}"


def labels(deployment: ModelDeployment) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGER, DEPLOYMENT_LABEL: deployment.metadata["name"]}


def serve_args(deployment: ModelDeployment, served: ServedModel) -> ServeAppArgs:
    """The application's arguments: the artifact, the task when known, and the spec's serving settings."""
    spec = deployment.spec
    return ServeAppArgs(
        model_uri=served.uri,
        # A FineTuneJob's artifact is a variant's own folder; a URI may be a run's output folder.
        variant=Variant(served.variant) if served.run is None and served.variant else Variant.BEST,
        task=served.task,
        model_name=deployment.metadata["name"],
        batching=spec.batching,
        max_new_tokens=spec.max_new_tokens,
        auth_token_file=TOKEN_FILE if spec.auth is not None else None,
        compile=spec.compile,
    )


def replica_cpus(deployment: ModelDeployment) -> int:
    """The CPUs Ray counts in a replica pod, all of them the replica's: `resources.cpu` rounded up to a whole number.

    Kubernetes is asked for exactly `resources.cpu` (500m, say); Ray's count only places the
    replica, and taking the whole pod keeps one replica per pod (two 500m replicas never share one).
    """
    return max(1, math.ceil(quantity_value(deployment.spec.resources.cpu)))


def serve_config(deployment: ModelDeployment, served: ServedModel) -> Manifest:
    """The Serve config (KubeRay's serveConfigV2) of one application and its one deployment."""
    spec = deployment.spec
    scaling, resources = spec.autoscaling, spec.resources
    actor: Manifest = {"num_cpus": float(replica_cpus(deployment))}
    if resources.gpus:
        actor["num_gpus"] = resources.gpus
    actor["runtime_env"] = {"env_vars": REPLICA_ENVIRONMENT}
    return {
        "logging_config": SERVE_LOGGING,
        "applications": [
            {
                "name": SERVE_APPLICATION,
                "import_path": SERVE_IMPORT_PATH,
                "route_prefix": spec.route_prefix,
                "args": serve_args(deployment, served).to_wire(),
                "deployments": [
                    {
                        "name": DEPLOYMENT,
                        "max_ongoing_requests": max(32, 2 * spec.batching.max_batch_size),
                        "autoscaling_config": {
                            "min_replicas": scaling.min_replicas,
                            "max_replicas": scaling.max_replicas,
                            "target_ongoing_requests": scaling.target_ongoing_requests,
                            "downscale_delay_s": scaling.downscale_delay_seconds,
                        },
                        "ray_actor_options": actor,
                    }
                ],
            }
        ],
    }


# How Serve runs, set on every Ray pod: Serve's proxy and controller read it where they start.
SERVE_POD_ENVIRONMENT = [{"name": name, "value": value} for name, value in SERVE_ENVIRONMENT.items()]


def _replica_environment(deployment: ModelDeployment) -> tuple[list[Manifest], list[Manifest]]:
    env, env_from = pods.storage_environment(deployment.spec.storage)
    return [*SERVE_POD_ENVIRONMENT, *env], env_from


def _token_volume(deployment: ModelDeployment) -> tuple[list[Manifest], list[Manifest]]:
    """(volumes, mounts) of the endpoint's token: the Secret's key as the file `token`, by reference, never copied.

    No subPath: kubelet updates only whole Secret volumes. Readable by the pod's group (fsGroup).
    """
    auth = deployment.spec.auth
    if auth is None:
        return [], []
    items = [{"key": auth.token_secret.key, "path": "token"}]
    volume = {
        "name": TOKEN_VOLUME,
        "secret": {"secretName": auth.token_secret.name, "items": items, "defaultMode": 0o440},
    }
    return [volume], [{"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT_PATH, "readOnly": True}]


def ray_cluster_config(deployment: ModelDeployment, served: ServedModel, settings: Settings) -> Manifest:
    """A Ray cluster whose worker pods each hold one replica; Ray's autoscaler adds pods as Serve adds replicas."""
    spec = deployment.spec
    resources = spec.resources
    env, env_from = _replica_environment(deployment)
    token_volumes, token_mounts = _token_volume(deployment)
    # Serve updates in place by stopping replicas first: with fewer than two, a new cluster keeps answering.
    per_artifact = {ARTIFACT_ANNOTATION: served.uri} if spec.autoscaling.min_replicas < 2 else {}
    worker = pods.RayPod(
        container="ray-worker",
        cpu=resources.cpu,
        cpu_limit=resources.cpu_limit,
        memory=resources.memory,
        ephemeral_storage=resources.ephemeral_storage,
        gpus=resources.gpus,
        placement=resources,
        labels=labels(deployment),
        annotations=per_artifact,
        env=env,
        env_from=env_from,
        claims=pods.pvc_claims([served.uri]),
        mounts=token_mounts,
        volumes=token_volumes,
        # An endpoint only reads the model it serves.
        read_only_claims=pods.pvc_claims([served.uri]),
    )
    head = pods.RayPod(
        container="ray-head",
        cpu=resources.head.cpu,
        cpu_limit=resources.head.cpu_limit,
        memory=resources.head.memory,
        ephemeral_storage=resources.head.ephemeral_storage,
        gpus=0,
        placement=resources,
        # The replicas' node placement (GPU pools) is theirs: the head has its own.
        nodes=resources.head,
        labels=labels(deployment),
        env=SERVE_POD_ENVIRONMENT,
        # KubeRay names the head's ServiceAccount (one it makes, with the autoscaler's RBAC), and
        # the pod mounts no token: only the autoscaler container gets one, through this volume.
        volumes=[pods.service_account_token_volume(AUTOSCALER_TOKEN_VOLUME)],
    )
    worker_params = {"num-cpus": str(replica_cpus(deployment))}
    if resources.gpus:
        worker_params["num-gpus"] = str(resources.gpus)
    autoscaler = resources.autoscaler
    requests = {"cpu": autoscaler.cpu, "memory": autoscaler.memory}
    limits = {"cpu": autoscaler.cpu_limit or autoscaler.cpu, "memory": autoscaler.memory}
    return {
        "rayVersion": pods.image_of(resources, settings)[1],
        # Ray's token authentication: the dashboard and its agent (job submission, Serve's REST API) ask
        # for KubeRay's per-cluster token; Serve's HTTP port 8000 does not (clients use spec.auth).
        **pods.auth_options(settings),
        "enableInTreeAutoscaling": True,
        # KubeRay adds the autoscaler as a second container of the head: restricted like the rest,
        # sized by the spec (these replace KubeRay's 500m/512Mi), and the one container that talks
        # to the API server (it watches and scales the RayCluster) with the ServiceAccount's token.
        "autoscalerOptions": {
            "resources": {"requests": requests, "limits": limits},
            "securityContext": pods.container_security(),
            "volumeMounts": [
                {"name": pods.TMP_VOLUME, "mountPath": "/tmp"},
                {"name": AUTOSCALER_TOKEN_VOLUME, "mountPath": pods.SERVICE_ACCOUNT_PATH, "readOnly": True},
            ],
        },
        "headGroupSpec": {
            # No replicas on the head: it runs Serve's controller and the dashboard KubeRay talks to.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": head.template(settings),
        },
        "workerGroupSpecs": [
            {
                "groupName": "replicas",
                "replicas": spec.autoscaling.min_replicas,
                "minReplicas": spec.autoscaling.min_replicas,
                "maxReplicas": spec.autoscaling.max_replicas,
                "rayStartParams": worker_params,
                "template": worker.template(settings),
            }
        ],
    }


def build_network_policy(deployment: ModelDeployment, settings: Settings) -> Manifest:
    """Only the endpoint's own pods reach its Ray cluster (and KubeRay, and a metrics scraper when the
    settings name one, on Ray's and HAProxy's metrics ports); clients reach Serve's HTTP port."""
    metadata = {
        "name": ray_service_name(deployment),
        "namespace": deployment.metadata["namespace"],
        "labels": labels(deployment),
        "ownerReferences": [controller_reference(API_VERSION, KIND, deployment.metadata)],
    }
    return pods.network_policy(
        metadata,
        labels(deployment),
        settings,
        open_ports=[SERVE_PORT],
        metrics_ports=[pods.RAY_METRICS_PORT, pods.HAPROXY_METRICS_PORT],
    )


def build_ray_service(deployment: ModelDeployment, served: ServedModel, settings: Settings) -> Manifest:
    """The RayService serving `served` as `deployment` says, owned by the deployment."""
    meta = deployment.metadata
    spec: Manifest = {
        "serveConfigV2": yaml.safe_dump(serve_config(deployment, served), sort_keys=False),
        "rayClusterConfig": ray_cluster_config(deployment, served, settings),
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {
            "name": ray_service_name(deployment),
            "namespace": meta["namespace"],
            "labels": labels(deployment),
            # What the operator last applied: the RayService is updated when, and only when, this changes.
            "annotations": {APPLIED_HASH_ANNOTATION: digest},
            "ownerReferences": [controller_reference(API_VERSION, KIND, deployment.metadata)],
        },
        "spec": spec,
    }
