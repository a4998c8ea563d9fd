"""Pieces of the Ray pods every kind builds: image, resources, storage access, volumes, placement, security.

Pure: no I/O, no clock, no kopf. Runs (RayJob) and endpoints (RayService) share them,
so a model is trained and served with the same image, credentials, placement and
security rules.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune.operator.api.common import NodePlacement, Placement, StorageAccess
from kubetune.operator.images import CACHE_MOUNT_PATH, POD_GROUP_ID, POD_USER_ID, PVC_ROOT
from kubetune.operator.naming import fit
from kubetune.operator.settings import Settings

Manifest = dict[str, Any]
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# The taint GPU node pools commonly carry (the NVIDIA GPU operator's and the cloud providers' convention).
GPU_TOLERATION: Manifest = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
# Ray's ports: the dashboard (job submission, KubeRay's status polls), the dashboard agent, Ray's
# Prometheus metrics (KubeRay's default metrics port), and the metrics of Serve's HAProxy (an endpoint's).
DASHBOARD_PORT = 8265
DASHBOARD_AGENT_PORT = 52365
RAY_METRICS_PORT = 8080
HAPROXY_METRICS_PORT = 9101
# The label Kubernetes gives every namespace: its name (what a NetworkPolicy selects a namespace by).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# Ray's token authentication, as KubeRay's RayCluster spec.authOptions says it (KubeRay 1.5.1 and later).
TOKEN_AUTH_OPTIONS: Manifest = {"mode": "token"}
# Writable places on a read-only root filesystem: Ray's session files and logs live under /tmp.
TMP_VOLUME, CACHE_VOLUME, SHM_VOLUME = "tmp", "cache", "shm"
# Where Kubernetes clients look for the pod's ServiceAccount credentials (token, CA bundle, namespace).
SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# The token Kubernetes itself projects lives this long; the API server extends it, and kubelet renews it.
SERVICE_ACCOUNT_TOKEN_SECONDS = 3607
# The runtime setting (`RuntimeSettings.preemption_notice`) naming the file a training pod's preStop hook
# creates, on the writable /tmp: the workers there save a checkpoint at their next step and stop.
PREEMPTION_NOTICE_VARIABLE = "KUBETUNE_PREEMPTION_NOTICE"
PREEMPTION_NOTICE_PATH = "/tmp/kubetune-preemption-notice"
# Seconds the preStop hook waits for Ray to drain the pod's node (a few seconds: it connects to Ray first).
DRAIN_TIMEOUT_SECONDS = 20
# Seconds of the grace period the preStop hook leaves for `ray stop` after waiting for busy processes.
STOP_MARGIN_SECONDS = 10
# huggingface_hub's own variables: a mirror of the hub, and no hub at all (the image's cache only).
HUB_ENDPOINT_VARIABLE, HUB_OFFLINE_VARIABLE = "HF_ENDPOINT", "HF_HUB_OFFLINE"


def pvc_claims(uris: Iterable[str | None]) -> list[str]:
    """Claims named by pvc:// URIs, each once, in order of appearance."""
    claims: list[str] = []
    for uri in uris:
        if uri and uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def claim_volume_name(claim: str) -> str:
    """A volume name (DNS-1123 label, ≤ 63) for any claim name (a subdomain: dots, up to 253)."""
    return fit(f"pvc-{claim.replace('.', '-')}", limit=63)


def storage_environment(storage: StorageAccess | None) -> tuple[list[Manifest], list[Manifest]]:
    """(env, envFrom) that give a pod access to object storage and model hubs; credentials by reference only.

    HF_HUB_CACHE is never set: an image that carries models sets it to its own read-only folder,
    outside the cache emptyDir (see `writable_volumes`), and the pods must keep finding them there.
    """
    env: list[Manifest] = []
    env_from: list[Manifest] = []
    if storage is not None:
        if storage.s3_endpoint:
            env.append({"name": "AWS_ENDPOINT_URL", "value": storage.s3_endpoint})
        if storage.s3_region:
            env.append({"name": "AWS_DEFAULT_REGION", "value": storage.s3_region})
        hub = storage.hugging_face
        if hub is not None and hub.endpoint:
            env.append({"name": HUB_ENDPOINT_VARIABLE, "value": hub.endpoint})
        if hub is not None and hub.offline:
            env.append({"name": HUB_OFFLINE_VARIABLE, "value": "1"})
        if storage.credentials_secret is not None:
            # Referenced, never copied: the values stay in the Secret.
            env_from.append({"secretRef": {"name": storage.credentials_secret.name}})
    return env, env_from


def placement(nodes: NodePlacement, priority_class: str | None, gpu_type: str | None, gpus: int) -> Manifest:
    """Node selection, tolerations, affinity and priority of a pod (GPU pods also select the GPU model)."""
    pod: Manifest = {}
    selector = dict(nodes.node_selector or {})
    if gpus and gpu_type:
        selector[GPU_PRODUCT_LABEL] = gpu_type
    if selector:
        pod["nodeSelector"] = selector
    tolerations = [t.to_wire() for t in nodes.tolerations or []]
    if gpus and GPU_TOLERATION not in tolerations:
        tolerations.append(dict(GPU_TOLERATION))
    if tolerations:
        pod["tolerations"] = tolerations
    affinity = nodes.affinity.to_wire() if nodes.affinity else None
    if affinity:
        pod["affinity"] = affinity
    if priority_class:
        pod["priorityClassName"] = priority_class
    return pod


def image_of(spec: Placement, settings: Settings) -> tuple[str, str]:
    """The runtime image of the pods and the Ray version it carries."""
    if spec.image is None:
        return settings.runtime_image, settings.ray_version
    return spec.image, spec.ray_version or settings.ray_version


def pull_secrets(spec: Placement, settings: Settings) -> list[Manifest]:
    names = [*settings.pull_secret_names, *(spec.image_pull_secrets or [])]
    return [{"name": name} for name in dict.fromkeys(names)]


def pod_security() -> Manifest:
    """The restricted Pod Security level, as the Ray image's user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": POD_USER_ID,
        "runAsGroup": POD_GROUP_ID,
        "fsGroup": POD_GROUP_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def writable_volumes() -> tuple[list[Manifest], list[Manifest], list[Manifest]]:
    """(volumes, mounts, env) of the writable places: /tmp, the caches, and shared memory for Ray's object store."""
    volumes = [
        {"name": TMP_VOLUME, "emptyDir": {}},
        {"name": CACHE_VOLUME, "emptyDir": {}},
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
        {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT_PATH},
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
    ]
    # HF_HOME (downloads, token, modules) lives in the emptyDir; an image's own HF_HUB_CACHE, when it sets
    # one, takes precedence over HF_HOME for models, so the models it carries outside the emptyDir stay visible.
    env = [
        {"name": "XDG_CACHE_HOME", "value": CACHE_MOUNT_PATH},
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT_PATH}/huggingface"},
    ]
    return volumes, mounts, env


def service_account_token_volume(name: str) -> Manifest:
    """The pod's ServiceAccount credentials as Kubernetes projects them when it mounts a token itself.

    For a pod that mounts no token (automountServiceAccountToken: false) but has one container that
    needs the API: mounted at SERVICE_ACCOUNT_PATH in that container only.
    """
    namespace = {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
    return {
        "name": name,
        "projected": {
            "defaultMode": 0o644,
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": SERVICE_ACCOUNT_TOKEN_SECONDS}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [namespace]}},
            ],
        },
    }


@dataclass(frozen=True)
class RayPod:
    """One Ray pod template: its container, resources, environment, volumes, placement and security."""

    container: str
    cpu: str  # the request; also the limit unless cpu_limit
    memory: str
    gpus: int
    placement: Placement  # image, pull secrets, priority, GPU type (and node placement unless `nodes` is given)
    ephemeral_storage: str | None = None
    cpu_limit: str | None = None
    nodes: NodePlacement | None = None  # the head's own node placement
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    service_account: str | None = None
    # Only the pod that reports to the operator mounts its ServiceAccount token.
    mount_token: bool = False
    env: Sequence[Manifest] = ()
    env_from: Sequence[Manifest] = ()
    claims: Sequence[str] = ()
    # Claims the pod only reads (inputs, served models): mounted, and claimed, read-only.
    read_only_claims: Collection[str] = ()
    mounts: Sequence[Manifest] = field(default=())  # besides the claims' and the writable places'
    volumes: Sequence[Manifest] = field(default=())
    termination_grace_seconds: int | None = None  # how long the pod's deletion may take
    pre_stop: Sequence[str] = ()  # a command the kubelet runs before it stops the container

    def template(self, settings: Settings) -> Manifest:
        limits: dict[str, Any] = {"cpu": self.cpu_limit or self.cpu, "memory": self.memory}
        requests: dict[str, Any] = {"cpu": self.cpu, "memory": self.memory}
        if self.ephemeral_storage:
            requests["ephemeral-storage"] = self.ephemeral_storage
        if self.gpus:
            limits[GPU_RESOURCE] = self.gpus
        scratch_volumes, scratch_mounts, scratch_env = writable_volumes()
        env = [{"name": "KUBETUNE_PVC_ROOT", "value": PVC_ROOT}, *scratch_env, *self.env]
        read_only = {claim: {"readOnly": True} if claim in self.read_only_claims else {} for claim in self.claims}
        root = PVC_ROOT
        mounts = [
            *scratch_mounts,
            *(
                {"name": claim_volume_name(claim), "mountPath": f"{root}/{claim}", **read_only[claim]}
                for claim in self.claims
            ),
            *self.mounts,
        ]
        volumes = [
            *scratch_volumes,
            *(
                {"name": claim_volume_name(claim), "persistentVolumeClaim": {"claimName": claim, **read_only[claim]}}
                for claim in self.claims
            ),
            *self.volumes,
        ]
        main: Manifest = {
            "name": self.container,
            "image": image_of(self.placement, settings)[0],
            "resources": {"requests": requests, "limits": limits},
            "env": env,
            "securityContext": container_security(),
            "volumeMounts": mounts,
        }
        if self.env_from:
            main["envFrom"] = list(self.env_from)
        if self.pre_stop:
            main["lifecycle"] = {"preStop": {"exec": {"command": list(self.pre_stop)}}}
        spec: Manifest = {
            "containers": [main],
            "volumes": volumes,
            "securityContext": pod_security(),
            "automountServiceAccountToken": self.mount_token,
            **placement(
                self.nodes or self.placement, self.placement.priority_class_name, self.placement.gpu_type, self.gpus
            ),
        }
        if self.termination_grace_seconds is not None:
            spec["terminationGracePeriodSeconds"] = self.termination_grace_seconds
        if self.service_account:
            spec["serviceAccountName"] = self.service_account
        secrets = pull_secrets(self.placement, settings)
        if secrets:
            spec["imagePullSecrets"] = secrets
        metadata: Manifest = {"labels": dict(self.labels)}
        if self.annotations:
            metadata["annotations"] = dict(self.annotations)
        return {"metadata": metadata, "spec": spec}


def stop_hook(grace_seconds: int, notice: str = PREEMPTION_NOTICE_PATH, worker: bool = True) -> list[str]:
    """The preStop command of a run's Ray pod.

    The kubelet's SIGTERM reaches only the container's PID 1, the shell that runs `ray start --block`,
    which drops it: the pod would live out its grace period. So the hook ends Ray itself, once no process
    of the run on the pod is busy (the runtime marks a training worker or the driver busy as
    `<notice>.<pid>.busy`; see its `training.preemption`). While a worker trains, the hook first drains
    the pod's Ray node (reason preemption, the grace period as its deadline; `ray drain-node` drains the
    node it runs on), so Ray places the restarted workers elsewhere, then creates the notice file: the
    workers save a checkpoint at their next step and stop. The head waits for its driver, which records
    that checkpoint. The wait ends early enough for `ray stop` to run before the kubelet's SIGKILL.
    """
    wait = max(1, grace_seconds - STOP_MARGIN_SECONDS)
    busy = (
        f'busy() {{ for f in "{notice}".*.busy; do [ -e "$f" ] || continue; pid=${{f#"{notice}".}};'
        ' kill -0 "${pid%.busy}" 2>/dev/null && return 0; done; return 1; }'
    )
    notify = (
        f"timeout {DRAIN_TIMEOUT_SECONDS} ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION"
        f" --reason-message 'kubetune: pod deleted' --deadline-remaining-seconds {grace_seconds}"
        f' >/dev/null 2>&1; touch "{notice}"; '
        if worker
        else ""
    )
    script = (
        f"{busy}; if busy; then {notify}end=$(($(date +%s) + {wait}));"
        ' while busy && [ "$(date +%s)" -lt "$end" ]; do sleep 1; done; fi;'
        " ray stop --force >/dev/null 2>&1; exit 0"
    )
    return ["/bin/sh", "-c", script]


def auth_options(settings: Settings) -> Manifest:
    """The RayCluster's authOptions field: Ray's token authentication when the settings turn it on."""
    return {"authOptions": dict(TOKEN_AUTH_OPTIONS)} if settings.kuberay_auth_options else {}


def _peer(namespace: str, pod_labels: Mapping[str, str]) -> Manifest:
    """Pods with `pod_labels` (all of them when empty) in `namespace` (empty: the policy's own namespace)."""
    peer: Manifest = {}
    if namespace:
        peer["namespaceSelector"] = {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}
    peer["podSelector"] = {"matchLabels": dict(pod_labels)} if pod_labels else {}
    return peer


def _ports(ports: Iterable[int]) -> list[Manifest]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def network_policy(
    metadata: Manifest,
    pod_labels: Mapping[str, str],
    settings: Settings,
    open_ports: Sequence[int] = (),
    metrics_ports: Sequence[int] = (RAY_METRICS_PORT,),
) -> Manifest:
    """Closes a Ray cluster to everything but its own pods, the KubeRay operator (from its namespace) on the
    dashboard and agent ports, a metrics scraper (when the settings name one) on `metrics_ports`, and
    `open_ports` (a Serve endpoint's) from anywhere. Egress stays open (storage, hubs)."""
    ingress: list[Manifest] = [{"from": [{"podSelector": {"matchLabels": dict(pod_labels)}}]}]
    operator_labels = settings.kuberay_operator_selector
    if operator_labels:
        ingress.append(
            {
                "from": [_peer(settings.kuberay_namespace.strip(), operator_labels)],
                "ports": _ports((DASHBOARD_PORT, DASHBOARD_AGENT_PORT)),
            }
        )
    if settings.ray_metrics_scraped and metrics_ports:
        scraper = _peer(settings.ray_metrics_namespace.strip(), settings.ray_metrics_pod_selector)
        ingress.append({"from": [scraper], "ports": _ports(metrics_ports)})
    if open_ports:
        ingress.append({"ports": _ports(open_ports)})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {"podSelector": {"matchLabels": dict(pod_labels)}, "policyTypes": ["Ingress"], "ingress": ingress},
    }
