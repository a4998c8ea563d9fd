"""ModelDeployment → RayService (pure): the Serve config, the autoscaling cluster, secrets by reference."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kubetune.operator.api.manifests import parse
from kubetune.operator.api.modeldeployment import ModelDeployment, ServedModel
from kubetune.operator.builders.modeldeployment import build_network_policy, build_ray_service, endpoint
from kubetune.operator.settings import Settings
from kubetune.runtime.contract import Task
from kubetune.runtime.contract.common import quantity_value as quantity
from kubetune.runtime.contract.serving import ServeAppArgs

from ..conftest import mutated

RUN_2 = ServedModel(
    uri="s3://out/runs/2/variants/int8", fine_tune_job="tickets", run=2, variant="int8", task=Task.TEXT_CLASSIFICATION
)
RUN_3 = RUN_2.model_copy(update={"uri": "s3://out/runs/3/variants/int8", "run": 3})


def make(document: dict[str, Any]) -> ModelDeployment:
    deployment = parse(mutated(mutated(document, "metadata.namespace", "ml"), "metadata.uid", "md-uid"))
    assert isinstance(deployment, ModelDeployment)
    return deployment


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2", 2.0),
        ("500m", 0.5),
        ("1.5", 1.5),
        ("2Gi", 2 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1e3", 1000.0),
        ("3k", 3000),
    ],
)
def test_quantities(text: str, value: float) -> None:
    assert quantity(text) == value


def test_the_serve_config_names_the_application_and_its_arguments(deployment: dict[str, Any]) -> None:
    service = build_ray_service(make(deployment), RUN_2, Settings())
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = config["applications"]
    assert app["import_path"] == "kubetune.runtime.serving.app:build" and app["route_prefix"] == "/"
    assert app["args"]["modelUri"] == RUN_2.uri and app["args"]["task"] == "text-classification"
    assert app["args"]["batching"] == {"maxBatchSize": 16, "batchWaitTimeoutMs": 5.0}
    assert app["args"]["authTokenFile"] == "/var/run/secrets/kubetune.io/endpoint-token/token"
    assert "authTokenEnv" not in app["args"]
    [serve_deployment] = app["deployments"]
    assert serve_deployment["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 4.0, "downscale_delay_s": 300,
    }  # fmt: skip
    assert serve_deployment["ray_actor_options"] == {
        "num_cpus": 2.0, "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
    }  # fmt: skip


def test_the_cluster_autoscales_one_replica_per_worker_pod(deployment: dict[str, Any]) -> None:
    cluster = build_ray_service(make(deployment), RUN_2, Settings())["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    [workers] = cluster["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["maxReplicas"], workers["replicas"]) == (1, 8, 1)
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "10Gi"}
    assert workers["rayStartParams"] == {"num-cpus": "2"}


def test_every_ray_pod_runs_serve_the_same_way(deployment: dict[str, Any]) -> None:
    service = build_ray_service(make(deployment), RUN_2, Settings())
    cluster = service["spec"]["rayClusterConfig"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        env = group["template"]["spec"]["containers"][0]["env"]
        assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in env
        assert {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"} in env
        assert {"name": "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S", "value": "60"} in env
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["logging_config"] == {"enable_access_log": False}


@pytest.mark.parametrize(
    ("uri", "claims"),
    [("pvc://models/runs/2/variants/int8", ["models"]), ("s3://out/runs/2/variants/int8", [])],
)
def test_an_endpoint_mounts_the_model_it_serves_read_only(
    deployment: dict[str, Any], uri: str, claims: list[str]
) -> None:
    service = build_ray_service(make(deployment), RUN_2.model_copy(update={"uri": uri}), Settings())
    (worker,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    spec = worker["template"]["spec"]
    volumes = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert [v["persistentVolumeClaim"] for v in volumes] == [{"claimName": claim, "readOnly": True} for claim in claims]
    mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] in {v["name"] for v in volumes}]
    assert [(m["mountPath"], m.get("readOnly")) for m in mounts] == [(f"/mnt/pvc/{claim}", True) for claim in claims]


def test_secrets_travel_by_reference_only(deployment: dict[str, Any]) -> None:
    service = build_ray_service(make(deployment), RUN_2, Settings())
    container = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "training-storage"}}]
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage.svc:9000"} in container["env"]


def test_the_token_is_a_secret_volume_of_the_replicas_never_an_env_var(deployment: dict[str, Any]) -> None:
    """kubelet updates a mounted Secret in place (the replicas re-read the file); an env var would stay as it was."""
    cluster = build_ray_service(make(deployment), RUN_2, Settings())["spec"]["rayClusterConfig"]
    replica = cluster["workerGroupSpecs"][0]["template"]["spec"]
    [token] = [volume for volume in replica["volumes"] if "secret" in volume]
    assert token == {
        "name": "endpoint-token",
        "secret": {
            "secretName": "support-tickets-endpoint",
            "items": [{"key": "token", "path": "token"}],
            "defaultMode": 0o440,
        },
    }
    [container] = replica["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "endpoint-token"]
    assert mount == {
        "name": "endpoint-token",
        "mountPath": "/var/run/secrets/kubetune.io/endpoint-token",
        "readOnly": True,
    }
    assert "subPath" not in mount  # kubelet never updates a subPath mount
    assert "secretKeyRef" not in json.dumps(cluster)
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "endpoint-token" not in json.dumps(head)  # only the replicas hold the token
    args = ServeAppArgs.model_validate(
        yaml.safe_load(build_ray_service(make(deployment), RUN_2, Settings())["spec"]["serveConfigV2"])["applications"][
            0
        ]["args"]
    )
    assert args.auth_token_file == f"{mount['mountPath']}/token" and args.auth_token_env is None


def test_an_open_endpoint_mounts_no_token(deployment: dict[str, Any]) -> None:
    open_deployment = make(mutated(deployment, "spec.auth", None))
    service = build_ray_service(open_deployment, RUN_2, Settings())
    assert "endpoint-token" not in json.dumps(service["spec"]["rayClusterConfig"])
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert "authTokenFile" not in args and "authTokenEnv" not in args


def test_the_model_hub_settings_reach_the_serving_pods(deployment: dict[str, Any]) -> None:
    offline = mutated(deployment, "spec.storage.huggingFace", {"offline": True})
    service = build_ray_service(make(offline), RUN_2, Settings())
    replica = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in replica["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and "HF_ENDPOINT" not in env and "HF_HUB_CACHE" not in env


def test_a_new_artifact_changes_only_the_serve_config(deployment: dict[str, Any]) -> None:
    deployment = mutated(deployment, "spec.autoscaling.minReplicas", 2)
    first, second = (build_ray_service(make(deployment), run, Settings()) for run in (RUN_2, RUN_3))
    assert first["spec"]["rayClusterConfig"] == second["spec"]["rayClusterConfig"]  # an in-place Serve upgrade
    assert first["spec"]["serveConfigV2"] != second["spec"]["serveConfigV2"]
    hashes = {json.dumps(s["metadata"]["annotations"], sort_keys=True) for s in (first, second)}
    assert len(hashes) == 2
    again = build_ray_service(make(deployment), RUN_2, Settings())
    assert again == first  # pure: the same inputs give the same manifest


@pytest.mark.parametrize("min_replicas", [0, 1])
def test_with_fewer_than_two_replicas_a_new_artifact_gets_a_new_cluster(
    deployment: dict[str, Any], min_replicas: int
) -> None:
    """Serve's in-place update stops the only replica before its successor starts: KubeRay's new cluster
    keeps the old one answering until the new one serves."""
    deployment = mutated(deployment, "spec.autoscaling.minReplicas", min_replicas)
    first, second = (build_ray_service(make(deployment), run, Settings()) for run in (RUN_2, RUN_3))
    assert first["spec"]["rayClusterConfig"] != second["spec"]["rayClusterConfig"]
    template = second["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    assert template["metadata"]["annotations"] == {"kubetune.io/artifact": RUN_3.uri}


def test_the_service_is_owned_labelled_and_named_within_kuberays_limits(deployment: dict[str, Any]) -> None:
    long_name = "a-very-long-model-deployment-name-that-goes-right-to-the-limits"  # 63 characters
    service = build_ray_service(make(mutated(deployment, "metadata.name", long_name)), RUN_2, Settings())
    meta = service["metadata"]
    assert len(meta["name"]) <= 47 and meta["labels"]["kubetune.io/modeldeployment"] == long_name
    owner = meta["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("ModelDeployment", "md-uid", True)


def test_the_endpoint_is_kuberays_serve_service(deployment: dict[str, Any]) -> None:
    routed = make(mutated(deployment, "spec.routePrefix", "/tickets"))
    assert endpoint(routed) == "http://support-tickets-serve-svc.ml.svc:8000/tickets"


def test_gpu_replicas_ask_for_gpus_on_both_levels(deployment: dict[str, Any]) -> None:
    gpu = make(mutated(deployment, "spec.resources", {"cpu": "4", "memory": "16Gi", "gpus": 1, "gpuType": "L4"}))
    service = build_ray_service(gpu, RUN_2, Settings())
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 1
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["rayStartParams"] == {"num-cpus": "4", "num-gpus": "1"}
    pod = workers["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "L4"}


@pytest.mark.parametrize(
    ("asked", "task", "compiled"),
    [
        (None, Task.TEXT_CLASSIFICATION, True),  # where bench/serving.py measured it faster
        (None, Task.IMAGE_CLASSIFICATION, False),
        (None, Task.CAUSAL_LM, False),
        (False, Task.TEXT_CLASSIFICATION, False),
        (True, Task.IMAGE_CLASSIFICATION, True),
    ],
)
def test_torch_compile_is_on_where_it_pays_unless_the_spec_says(
    deployment: dict[str, Any], asked: bool | None, task: Task, compiled: bool
) -> None:
    document = mutated(deployment, "spec.compile", asked) if asked is not None else deployment
    service = build_ray_service(make(document), RUN_2, Settings())
    args = ServeAppArgs.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert args.compile is asked and args.compiles(task) is compiled


def test_the_endpoint_is_open_on_serves_port_only(deployment: dict[str, Any]) -> None:
    model = make(deployment)
    policy = build_network_policy(model, Settings())
    assert policy["metadata"]["name"] == build_ray_service(model, RUN_2, Settings())["metadata"]["name"]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "md-uid"
    pods = {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/modeldeployment": "support-tickets"}
    assert policy["spec"]["podSelector"] == {"matchLabels": pods}
    own, kuberay, clients = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": pods}}]}
    assert {port["port"] for port in kuberay["ports"]} == {8265, 52365}
    assert clients == {"ports": [{"protocol": "TCP", "port": 8000}]}  # from anywhere
    cluster = build_ray_service(model, RUN_2, Settings())["spec"]["rayClusterConfig"]
    assert cluster["autoscalerOptions"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert template["metadata"]["labels"] == pods
        assert template["spec"]["automountServiceAccountToken"] is False
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True


def test_gpu_placement_is_the_replicas_not_the_heads(deployment: dict[str, Any]) -> None:
    resources = {"cpu": "4", "memory": "16Gi", "gpus": 1, "gpuType": "L4", "nodeSelector": {"pool": "gpu"}}
    cluster = build_ray_service(make(mutated(deployment, "spec.resources", resources)), RUN_2, Settings())
    head = cluster["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    worker = cluster["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert not {"nodeSelector", "tolerations"} & set(head)
    assert worker["nodeSelector"] == {"pool": "gpu", "nvidia.com/gpu.product": "L4"}
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def head_and_autoscaler(cluster: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return cluster["headGroupSpec"]["template"]["spec"], cluster["autoscalerOptions"]


def test_only_the_autoscaler_container_holds_a_service_account_token(deployment: dict[str, Any]) -> None:
    cluster = build_ray_service(make(deployment), RUN_2, Settings())["spec"]["rayClusterConfig"]
    head, autoscaler = head_and_autoscaler(cluster)
    # KubeRay names the head's ServiceAccount (the one it makes for the autoscaler, with its RBAC).
    assert "serviceAccountName" not in head and head["automountServiceAccountToken"] is False
    token = next(v for v in head["volumes"] if v["name"] == "autoscaler-token")
    sources = token["projected"]["sources"]
    assert sources[0] == {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}
    assert sources[1] == {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
    assert sources[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == "metadata.namespace"
    mount = {"name": "autoscaler-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}
    assert mount in autoscaler["volumeMounts"]
    # The Ray containers (head and replicas) have no token, mounted or projected.
    (ray_head,) = head["containers"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert "autoscaler-token" not in {m["name"] for m in ray_head["volumeMounts"]}
    assert "autoscaler-token" not in {v["name"] for v in worker["volumes"]}
    assert worker["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    ("resources", "head_wanted", "autoscaler_wanted"),
    [
        ({}, {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "10Gi"}, {"cpu": "500m", "memory": "512Mi"}),
        (
            {"head": {"cpu": "250m", "memory": "1Gi", "ephemeralStorage": "2Gi"}, "autoscaler": {"cpu": "100m"}},
            {"cpu": "250m", "memory": "1Gi", "ephemeral-storage": "2Gi"},
            {"cpu": "100m", "memory": "512Mi"},
        ),
        ({"autoscaler": {"cpu": "200m", "memory": "300Mi"}}, None, {"cpu": "200m", "memory": "300Mi"}),
    ],
)
def test_the_head_and_the_autoscaler_are_sized_by_the_spec(
    deployment: dict[str, Any],
    resources: dict[str, Any],
    head_wanted: dict[str, str] | None,
    autoscaler_wanted: dict[str, str],
) -> None:
    document = mutated(deployment, "spec.resources", {"cpu": "1", **resources})
    cluster = build_ray_service(make(document), RUN_2, Settings())["spec"]["rayClusterConfig"]
    head, autoscaler = head_and_autoscaler(cluster)
    requests = head["containers"][0]["resources"]["requests"]
    assert requests == (head_wanted or {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "10Gi"})
    assert head["containers"][0]["resources"]["limits"] == {"cpu": requests["cpu"], "memory": requests["memory"]}
    # Written out, so KubeRay's 500m/512Mi default never applies unseen.
    assert autoscaler["resources"] == {"requests": autoscaler_wanted, "limits": autoscaler_wanted}


def test_cpu_limits_above_the_requests_let_the_pods_burst(deployment: dict[str, Any]) -> None:
    resources = {
        "cpu": "400m",
        "cpuLimit": "1",
        "head": {"cpu": "250m", "cpuLimit": "1500m"},
        "autoscaler": {"cpu": "100m", "cpuLimit": "500m"},
    }
    cluster = build_ray_service(make(mutated(deployment, "spec.resources", resources)), RUN_2, Settings())
    config = cluster["spec"]["rayClusterConfig"]
    head, autoscaler = head_and_autoscaler(config)
    [worker] = config["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    cpu = {
        "head": head["containers"][0]["resources"],
        "replica": worker["resources"],
        "autoscaler": autoscaler["resources"],
    }
    assert {name: (r["requests"]["cpu"], r["limits"]["cpu"]) for name, r in cpu.items()} == {
        "head": ("250m", "1500m"),
        "replica": ("400m", "1"),
        "autoscaler": ("100m", "500m"),
    }
    # Ray still counts the replica pod by its request: one replica per pod.
    assert config["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] == "1"


def test_the_head_is_placed_by_its_own_placement(deployment: dict[str, Any]) -> None:
    resources = {"cpu": "1", "nodeSelector": {"pool": "gpu"}, "head": {"nodeSelector": {"pool": "system"}}}
    cluster = build_ray_service(make(mutated(deployment, "spec.resources", resources)), RUN_2, Settings())
    head = cluster["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    worker = cluster["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert (head["nodeSelector"], worker["nodeSelector"]) == ({"pool": "system"}, {"pool": "gpu"})


@pytest.mark.parametrize(
    ("cpu", "ray_cpus"),
    [("500m", 1), ("100m", 1), ("1", 1), ("1.5", 2), ("2", 2), ("2500m", 3)],
)
def test_a_replica_pod_requests_its_cpu_while_ray_counts_whole_cpus(
    deployment: dict[str, Any], cpu: str, ray_cpus: int
) -> None:
    service = build_ray_service(make(mutated(deployment, "spec.resources.cpu", cpu)), RUN_2, Settings())
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["cpu"] == cpu and container["resources"]["limits"]["cpu"] == cpu
    assert workers["rayStartParams"]["num-cpus"] == str(ray_cpus)
    # The replica takes all the pod's CPUs as Ray counts them: one replica per pod.
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["deployments"][0]["ray_actor_options"]["num_cpus"] == ray_cpus
