"""FineTuneJob run builder: spec in, manifests out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from kubetune.operator.api.finetunejob import DEFAULT_TERMINATION_GRACE_SECONDS, FineTuneJob, Trigger
from kubetune.operator.api.manifests import parse
from kubetune.operator.builders.finetunejob import RunManifests, build_run
from kubetune.operator.builders.pods import PREEMPTION_NOTICE_PATH, stop_hook
from kubetune.operator.images import RAY_VERSION
from kubetune.operator.naming import MAX_RAY_NAME_LENGTH, run_name
from kubetune.operator.planning.finetunejob import RunRequest
from kubetune.operator.settings import Settings, SettingsError
from kubetune.runtime.contract import RunConfig, Sharding

from ..conftest import REPO_ROOT, mutated

SETTINGS = Settings(runtime_image="registry.example/kubetune-runtime:1", finished_cluster_ttl_seconds=120)
REQUEST = RunRequest(
    number=3, trigger=Trigger.ANNOTATION, trigger_detail="retrain-1", spec_generation=2, trigger_hash="abcd"
)


def build(document: dict[str, Any], *edits: tuple[str, Any]) -> RunManifests:
    document = mutated(mutated(document, "metadata.namespace", "ml"), "metadata.uid", "uid-1")
    for path, value in edits:
        document = mutated(document, path, value)
    job = parse(document)
    assert isinstance(job, FineTuneJob)
    return build_run(job, REQUEST, SETTINGS)


def head(manifests: RunManifests) -> dict[str, Any]:
    spec: dict[str, Any] = manifests.ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    return spec


def submitter(manifests: RunManifests) -> dict[str, Any]:
    spec: dict[str, Any] = manifests.ray_job["spec"]["submitterPodTemplate"]["spec"]
    return spec


def workers(manifests: RunManifests) -> dict[str, Any]:
    group: dict[str, Any] = manifests.ray_job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    return group


def test_minimal_run(minimal_job: dict[str, Any]) -> None:
    manifests = build(minimal_job)
    ray_job = manifests.ray_job
    assert ray_job["metadata"]["name"] == "support-tickets-r3"
    assert ray_job["metadata"]["annotations"]["kubetune.io/trigger"] == "Annotation"
    assert ray_job["metadata"]["labels"]["kubetune.io/run"] == "3"
    spec = ray_job["spec"]
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 120 and spec["backoffLimit"] == 2
    assert "suspend" not in spec and spec["activeDeadlineSeconds"] == SETTINGS.default_active_deadline_seconds
    assert spec["entrypoint"] == "python -m kubetune.runtime.recipe.finetune --config /etc/kubetune/run/run.json"
    worker = workers(manifests)
    assert (worker["replicas"], worker["minReplicas"], worker["maxReplicas"]) == (1, 1, 1)
    container = worker["template"]["spec"]["containers"][0]
    assert container["image"] == SETTINGS.runtime_image
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "20Gi"}
    assert "nodeSelector" not in worker["template"]["spec"]
    assert head(manifests)["serviceAccountName"] == "support-tickets-r3-runner"


def test_every_object_is_owned_by_the_job(minimal_job: dict[str, Any]) -> None:
    for manifest in build(minimal_job).in_order():
        (owner,) = manifest["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "FineTuneJob",
            "support-tickets",
            "uid-1",
            True,
        )
        assert manifest["metadata"]["namespace"] == "ml"


def test_the_run_may_patch_its_report_and_nothing_else(minimal_job: dict[str, Any]) -> None:
    manifests = build(minimal_job)
    (rule,) = manifests.role["rules"]
    assert rule == {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["support-tickets-r3-report"],
        "verbs": ["patch"],
    }
    assert manifests.role_binding["subjects"][0]["name"] == manifests.service_account["metadata"]["name"]
    assert manifests.report["metadata"]["name"] == "support-tickets-r3-report"


def test_run_config_holds_the_contract_and_the_identity(complete_job: dict[str, Any]) -> None:
    manifests = build(complete_job)
    config = RunConfig.model_validate(json.loads(manifests.config["data"]["run.json"]))
    assert config.run.run_number == 3 and config.run.run_name == "support-tickets-tuned-r3"
    assert config.run.report_config_map == manifests.report["metadata"]["name"]
    assert (config.resources.workers, config.resources.gpus_per_worker) == (2, 1)
    assert config.spec.search is not None and config.spec.search.trials == 12
    assert "resources" not in json.loads(manifests.config["data"]["run.json"])["spec"]
    assert config.resources.sharding == Sharding.NONE


def test_run_config_carries_the_sharding(complete_job: dict[str, Any]) -> None:
    manifests = build(complete_job, ("spec.resources.sharding", "fsdp"))
    config = RunConfig.model_validate(json.loads(manifests.config["data"]["run.json"]))
    assert config.resources.sharding == Sharding.FSDP


@pytest.mark.parametrize(
    ("output", "run_output"),
    [
        ("s3://models/support-tickets", "s3://models/support-tickets/runs/3"),
        ("s3://models/support-tickets/", "s3://models/support-tickets/runs/3"),
        ("pvc://runs/support", "pvc://runs/support/runs/3"),
    ],
)
def test_each_run_writes_to_a_folder_of_its_own(complete_job: dict[str, Any], output: str, run_output: str) -> None:
    """Run 3 never overwrites the artifacts of run 2, which an endpoint may serve or roll back to."""
    manifests = build(complete_job, ("spec.output.uri", output))
    config = RunConfig.model_validate(json.loads(manifests.config["data"]["run.json"]))
    assert config.spec.output.uri == run_output


GPU_CASES = [
    # (edits, worker limits, worker rayStartParams, worker node selector)
    ([], {"cpu": "2", "memory": "8Gi"}, {}, None),
    (
        [("spec.resources.gpusPerWorker", 2)],
        {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 2},
        {"num-gpus": "2"},
        None,
    ),
    (
        [("spec.resources.gpusPerWorker", 1), ("spec.resources.gpuType", "NVIDIA-H200")],
        {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 1},
        {"num-gpus": "1"},
        {"nvidia.com/gpu.product": "NVIDIA-H200"},
    ),
    (
        [("spec.resources.cpuPerWorker", 4), ("spec.resources.memoryPerWorker", "16Gi")],
        {"cpu": "4", "memory": "16Gi"},
        {},
        None,
    ),
]


@pytest.mark.parametrize(("edits", "limits", "params", "selector"), GPU_CASES)
def test_gpus(
    minimal_job: dict[str, Any],
    edits: list[tuple[str, Any]],
    limits: dict[str, Any],
    params: dict[str, str],
    selector: dict[str, str] | None,
) -> None:
    manifests = build(minimal_job, *edits)
    worker = workers(manifests)
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"] == limits
    assert worker["rayStartParams"] == params
    assert worker["template"]["spec"].get("nodeSelector") == selector
    assert "nvidia.com/gpu" not in head(manifests)["containers"][0]["resources"]["limits"]
    assert manifests.ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}


def test_kueue(minimal_job: dict[str, Any]) -> None:
    manifests = build(minimal_job, ("spec.queueName", "team-a"))
    assert manifests.ray_job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert manifests.ray_job["spec"]["suspend"] is True


def test_secrets_are_referenced_never_copied(minimal_job: dict[str, Any]) -> None:
    storage = {"credentialsSecret": {"name": "s3-creds"}, "s3Endpoint": "http://minio:9000", "s3Region": "eu-1"}
    manifests = build(minimal_job, ("spec.storage", storage))
    for spec in (head(manifests), workers(manifests)["template"]["spec"]):
        container = spec["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_DEFAULT_REGION"] == "eu-1"
    text = json.dumps([m for m in manifests.in_order()])
    assert "secretKeyRef" not in text and text.count("s3-creds") == 2


def _env(spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in spec["containers"][0]["env"]}


@pytest.mark.parametrize(
    ("hub", "expected"),
    [
        (None, {}),
        ({}, {}),
        ({"endpoint": "http://hf-mirror.models.svc:8080"}, {"HF_ENDPOINT": "http://hf-mirror.models.svc:8080"}),
        ({"offline": True}, {"HF_HUB_OFFLINE": "1"}),
        ({"offline": False}, {}),  # leaves the image's own setting alone
    ],
)
def test_the_model_hub_settings_reach_every_ray_pod(
    minimal_job: dict[str, Any], hub: dict[str, Any] | None, expected: dict[str, str]
) -> None:
    storage: dict[str, Any] = {"s3Region": "eu-1"}
    if hub is not None:
        storage["huggingFace"] = hub
    manifests = build(minimal_job, ("spec.storage", storage))
    for spec in (head(manifests), workers(manifests)["template"]["spec"]):
        env = _env(spec)
        assert {k: v for k, v in env.items() if k in ("HF_ENDPOINT", "HF_HUB_OFFLINE")} == expected
        # The image's HF_HUB_CACHE (models it carries, outside the cache emptyDir) is never overridden.
        assert "HF_HUB_CACHE" not in env and env["HF_HOME"] == "/home/ray/.cache/huggingface"


def test_the_submitter_requests_little_cpu_and_may_burst_to_start(minimal_job: dict[str, Any]) -> None:
    for edits in ((), (("spec.resources.head", {"cpu": "4", "memory": "16Gi"}),)):
        (container,) = submitter(build(minimal_job, *edits))["containers"]
        assert container["resources"] == {
            "requests": {"cpu": "100m", "memory": "512Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        }


def test_pvc_volumes(minimal_job: dict[str, Any]) -> None:
    manifests = build(
        minimal_job,
        ("spec.data.train", "pvc://datasets/tickets/train.jsonl"),
        ("spec.data.test", "pvc://datasets/tickets/test.jsonl"),
        ("spec.output.uri", "pvc://runs/x"),
    )
    for spec in (head(manifests), workers(manifests)["template"]["spec"]):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["datasets", "runs"]
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["pvc-datasets"] == "/mnt/pvc/datasets" and mounts["pvc-runs"] == "/mnt/pvc/runs"
    config_volume = next(v for v in head(manifests)["volumes"] if v["name"] == "run-config")
    assert config_volume["configMap"]["name"] == "support-tickets-r3-config"


# A core/v1 Affinity with every part kubetune types, as a user writes it.
SPREAD_OUT = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "node-pool", "operator": "In", "values": ["gpu"]}]}]
        },
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 10,
                "preference": {"matchExpressions": [{"key": "gpu-count", "operator": "Gt", "values": ["4"]}]},
            }
        ],
    },
    "podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 100,
                "podAffinityTerm": {
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "kubetune"}},
                    "topologyKey": "kubernetes.io/hostname",
                },
            }
        ]
    },
}


def claim_access(spec: dict[str, Any]) -> dict[str, str]:
    """Each mounted claim and how: "ro" when both its volume and its mount are read-only, "rw" when neither."""
    volumes = {v["name"]: v["persistentVolumeClaim"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    access = {}
    for mount in spec["containers"][0]["volumeMounts"]:
        if mount["name"] in volumes:
            claim = volumes[mount["name"]]
            assert claim.get("readOnly", False) == mount.get("readOnly", False)  # the claim and its mount agree
            access[claim["claimName"]] = "ro" if mount.get("readOnly") else "rw"
    return access


# (model, training data, test data, output) → each claim's access in every Ray pod of the run
CLAIM_ACCESS = [
    (
        "pvc://models/base",
        "pvc://datasets/train.jsonl",
        "pvc://datasets/test.jsonl",
        "pvc://runs/x",
        {"models": "ro", "datasets": "ro", "runs": "rw"},
    ),
    (None, "pvc://runs/data/train.jsonl", None, "pvc://runs/x", {"runs": "rw"}),  # inputs on the output's claim
    ("pvc://runs/base", None, "pvc://datasets/test.jsonl", "s3://bucket/x", {"runs": "ro", "datasets": "ro"}),
    (None, None, None, "pvc://runs/x", {"runs": "rw"}),
    (None, "s3://bucket/train.jsonl", None, "s3://bucket/x", {}),
]


@pytest.mark.parametrize(("model", "train", "test", "output", "expected"), CLAIM_ACCESS)
def test_input_claims_are_mounted_read_only(
    minimal_job: dict[str, Any], model: str | None, train: str | None, test: str | None, output: str, expected: Any
) -> None:
    edits = [("spec.output.uri", output)]
    edits += [(path, uri) for path, uri in (("spec.model.uri", model), ("spec.data.train", train)) if uri]
    edits += [("spec.data.test", test)] if test else []
    manifests = build(minimal_job, *edits)
    for spec in (head(manifests), workers(manifests)["template"]["spec"]):
        assert claim_access(spec) == expected


def test_placement_of_the_workers_is_not_the_heads(complete_job: dict[str, Any]) -> None:
    manifests = build(complete_job, ("spec.resources.affinity", SPREAD_OUT))
    worker = workers(manifests)["template"]["spec"]
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert worker["affinity"] == SPREAD_OUT
    assert worker["nodeSelector"] == {"node-pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    for spec in (head(manifests), worker, submitter(manifests)):
        assert spec["priorityClassName"] == "training-low"
    for spec in (head(manifests), submitter(manifests)):  # no GPU: none of the GPU pool's placement
        assert spec["nodeSelector"] == {"node-pool": "cpu"} and not {"tolerations", "affinity"} & set(spec)
    assert manifests.ray_job["spec"]["activeDeadlineSeconds"] == 21600


def test_the_head_has_a_placement_of_its_own(minimal_job: dict[str, Any]) -> None:
    own = {"nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "spot", "operator": "Exists"}]}
    manifests = build(minimal_job, ("spec.resources.head", own), ("spec.resources.nodeSelector", {"pool": "big"}))
    for spec in (head(manifests), submitter(manifests)):
        assert spec["nodeSelector"] == {"pool": "cpu"} and spec["tolerations"] == [
            {"key": "spot", "operator": "Exists"}
        ]
    assert workers(manifests)["template"]["spec"]["nodeSelector"] == {"pool": "big"}


@pytest.mark.parametrize(
    ("resources", "head_cpu", "worker_cpu"),
    [
        ({}, ("1", "1"), ("2", "2")),
        (
            {"cpuPerWorker": "350m", "cpuLimitPerWorker": "1", "head": {"cpu": "250m", "cpuLimit": "1"}},
            ("250m", "1"),
            ("350m", "1"),
        ),
    ],
)
def test_cpu_limits_default_to_the_requests(
    minimal_job: dict[str, Any], resources: dict[str, Any], head_cpu: tuple[str, str], worker_cpu: tuple[str, str]
) -> None:
    manifests = build(minimal_job, ("spec.resources", resources))
    (head_container,) = head(manifests)["containers"]
    (worker_container,) = workers(manifests)["template"]["spec"]["containers"]
    for container, wanted in ((head_container, head_cpu), (worker_container, worker_cpu)):
        assert (container["resources"]["requests"]["cpu"], container["resources"]["limits"]["cpu"]) == wanted


def pod_specs(manifests: RunManifests) -> list[dict[str, Any]]:
    return [head(manifests), workers(manifests)["template"]["spec"], submitter(manifests)]


def test_every_pod_meets_the_restricted_pod_security_level(complete_job: dict[str, Any]) -> None:
    for spec in pod_specs(build(complete_job)):
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = spec["containers"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        }
        writable = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/home/ray/.cache", "/dev/shm"} <= writable


def test_only_the_head_mounts_the_runs_token(complete_job: dict[str, Any]) -> None:
    head_spec, worker_spec, submitter_spec = pod_specs(build(complete_job))
    assert head_spec["automountServiceAccountToken"] is True
    assert worker_spec["automountServiceAccountToken"] is False
    assert submitter_spec["automountServiceAccountToken"] is False and "serviceAccountName" not in submitter_spec


def test_pull_secrets_of_the_settings_and_the_spec(minimal_job: dict[str, Any]) -> None:
    settings = Settings(image_pull_secrets="org-registry, mirror")
    job = parse(mutated(mutated(minimal_job, "metadata.namespace", "ml"), "metadata.uid", "u"))
    assert isinstance(job, FineTuneJob)
    job.spec.resources.image_pull_secrets = ["team-registry", "mirror"]
    for spec in pod_specs(build_run(job, REQUEST, settings)):
        assert spec["imagePullSecrets"] == [{"name": "org-registry"}, {"name": "mirror"}, {"name": "team-registry"}]
    assert all("imagePullSecrets" not in spec for spec in pod_specs(build(minimal_job)))


def test_the_ray_cluster_is_closed_to_other_pods(minimal_job: dict[str, Any]) -> None:
    manifests = build(minimal_job)
    policy = manifests.network_policy["spec"]
    run_pods = {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/finetunejob": "support-tickets",
                "kubetune.io/run": "3"}  # fmt: skip
    assert policy["podSelector"] == {"matchLabels": run_pods} and policy["policyTypes"] == ["Ingress"]
    own, kuberay = policy["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": run_pods}}]}
    assert kuberay["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    assert {port["port"] for port in kuberay["ports"]} == {8265, 52365}
    for spec in (manifests.ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"],
                 workers(manifests)["template"], manifests.ray_job["spec"]["submitterPodTemplate"]):  # fmt: skip
        assert spec["metadata"]["labels"] == run_pods  # the policy selects every pod of the run
    assert manifests.in_order().index(manifests.network_policy) < manifests.in_order().index(manifests.ray_job)


def test_the_runtime_image_carries_its_ray_version(minimal_job: dict[str, Any]) -> None:
    default = build(minimal_job).ray_job["spec"]["rayClusterSpec"]
    assert default["rayVersion"] == SETTINGS.ray_version
    custom = build(
        minimal_job, ("spec.resources.image", "mirror.local/runtime:2"), ("spec.resources.rayVersion", "2.61.0")
    )
    assert custom.ray_job["spec"]["rayClusterSpec"]["rayVersion"] == "2.61.0"
    assert submitter(custom)["containers"][0]["image"] == "mirror.local/runtime:2"


def test_claim_volume_names_are_always_valid(minimal_job: dict[str, Any]) -> None:
    claim = "shared-datasets-" + "x" * 200
    manifests = build(minimal_job, ("spec.data.train", f"pvc://{claim}/train.jsonl"))
    (volume,) = [v for v in head(manifests)["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    assert len(volume["name"]) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", volume["name"])


def test_image_override(minimal_job: dict[str, Any]) -> None:
    manifests = build(minimal_job, ("spec.resources.image", "mirror.local/runtime:2"))
    assert head(manifests)["containers"][0]["image"] == "mirror.local/runtime:2"


def test_long_names_fit_kuberay_limits() -> None:
    name = run_name("a" * 63, 123)
    assert len(name) <= MAX_RAY_NAME_LENGTH and name.endswith("-r123")
    assert run_name("a" * 63, 123) != run_name("a" * 62 + "b", 123)


def test_the_same_inputs_give_the_same_manifests(complete_job: dict[str, Any]) -> None:
    assert build(complete_job).in_order() == build(complete_job).in_order()


def test_the_runtime_ray_version_is_the_pinned_one() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    pins = [p for p in pyproject["project"]["optional-dependencies"]["runtime"] if p.startswith("ray[")]
    assert [pin.partition("==")[2] for pin in pins] == [RAY_VERSION]
    assert Settings().runtime_image.endswith(f":{version('kubetune')}-gpu")


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("1", True), ("no", False), ("False", False)])
def test_switches_read_from_the_environment(raw: str, expected: bool) -> None:
    settings = Settings.from_environment({"KUBETUNE_KUBERAY_AUTH_OPTIONS": raw})
    assert settings.kuberay_auth_options is expected


def test_a_switch_that_is_not_one_is_refused() -> None:
    with pytest.raises(SettingsError, match="KUBETUNE_KUBERAY_AUTH_OPTIONS='maybe'"):
        Settings.from_environment({"KUBETUNE_KUBERAY_AUTH_OPTIONS": "maybe"})


def test_a_deleted_ray_pod_has_time_to_save_a_checkpoint(minimal_job: dict[str, Any]) -> None:
    """Every Ray pod of a run: a grace period from the spec (or the default), the runtime setting naming the
    notice file, and a preStop hook that ends Ray once nothing of the run is busy (the worker's first drains
    its node and tells its workers)."""
    own_grace = ("spec.resources.terminationGracePeriodSeconds", 600)
    for edits, grace in (((), DEFAULT_TERMINATION_GRACE_SECONDS), ((own_grace,), 600)):
        manifests = build(minimal_job, *edits)
        worker = workers(manifests)["template"]["spec"]
        for pod, hook in ((head(manifests), stop_hook(grace, worker=False)), (worker, stop_hook(grace))):
            assert pod["terminationGracePeriodSeconds"] == grace
            assert _env(pod)["KUBETUNE_PREEMPTION_NOTICE"] == PREEMPTION_NOTICE_PATH
            container = pod["containers"][0]
            assert container["lifecycle"]["preStop"]["exec"]["command"] == hook
            # On the pod's writable /tmp, which the processes of the pod share.
            assert any(PREEMPTION_NOTICE_PATH.startswith(m["mountPath"] + "/") for m in container["volumeMounts"])
        assert f"--deadline-remaining-seconds {grace} " in stop_hook(grace)[2]
        assert "drain-node" not in stop_hook(grace, worker=False)[2]
    assert "lifecycle" not in submitter(build(minimal_job))["containers"][0]


def _run_hook(tmp_path: Path, worker: bool, busy_for: float | None, grace: int = 30) -> tuple[list[str], float]:
    """Run a pod's preStop hook here, with a `ray` that records its calls; a process stays busy for `busy_for`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    calls.write_text("")
    fake_ray = bin_dir / "ray"
    fake_ray.write_text(f'#!/bin/sh\necho "$1" >> {calls}\n')
    fake_ray.chmod(0o755)
    notice = tmp_path / "notice"
    sleeper = None
    if busy_for is not None:
        # As the runtime does: the process removes its marker when its work is over (and lives on).
        sleeper = subprocess.Popen(["/bin/sh", "-c", f'sleep {busy_for}; rm -f "$0.$$.busy"; sleep 1', str(notice)])
        Path(f"{notice}.{sleeper.pid}.busy").touch()
    Path(f"{notice}.999999.busy").touch()  # a process that ended without removing its marker
    started = time.monotonic()
    subprocess.run(
        stop_hook(grace, str(notice), worker), env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, check=True
    )
    elapsed = time.monotonic() - started
    if sleeper is not None:
        sleeper.kill()
        sleeper.wait()
    touched = ["notice"] if notice.exists() else []
    return calls.read_text().split() + touched, elapsed


def test_an_idle_pod_stops_at_once(tmp_path: Path) -> None:
    for worker in (True, False):
        calls, elapsed = _run_hook(tmp_path, worker, busy_for=None)
        assert calls == ["stop"] and elapsed < 2


def test_a_busy_worker_pod_drains_notifies_and_waits_for_its_workers(tmp_path: Path) -> None:
    calls, elapsed = _run_hook(tmp_path, True, busy_for=2)
    assert calls == ["drain-node", "stop", "notice"] and 1.5 < elapsed < 5
    (tmp_path / "head").mkdir()
    head_calls, head_elapsed = _run_hook(tmp_path / "head", False, busy_for=2)
    assert head_calls == ["stop"] and 1.5 < head_elapsed < 5  # the head waits for its driver, and tells nobody


def test_the_wait_ends_before_the_grace_period_does(tmp_path: Path) -> None:
    calls, elapsed = _run_hook(tmp_path, True, busy_for=30, grace=12)  # waits 12 - 10 s, then stops Ray
    assert calls[-2:] == ["stop", "notice"] and elapsed < 6
