"""What closes a Ray cluster, for runs (RayJob) and endpoints (RayService): the NetworkPolicy's peers and
ports for each setting, and Ray's token authentication."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.operator.api.finetunejob import FineTuneJob, Trigger
from kubetune.operator.api.manifests import parse
from kubetune.operator.api.modeldeployment import ModelDeployment, ServedModel
from kubetune.operator.builders.finetunejob import build_run, build_run_network_policy
from kubetune.operator.builders.modeldeployment import build_network_policy, build_ray_service
from kubetune.operator.planning.finetunejob import RunRequest
from kubetune.operator.settings import Settings
from kubetune.runtime.contract import Task

from ..conftest import mutated

REQUEST = RunRequest(number=3, trigger=Trigger.ANNOTATION, trigger_detail="r", spec_generation=2, trigger_hash="ab")
SERVED = ServedModel(uri="s3://out/runs/2/variants/int8", fine_tune_job="t", run=2, variant="int8",
                     task=Task.TEXT_CLASSIFICATION)  # fmt: skip
RUN_PODS = {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/finetunejob": "support-tickets",
            "kubetune.io/run": "3"}  # fmt: skip
ENDPOINT_PODS = {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/modeldeployment": "support-tickets"}
KUBERAY_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}


def job_of(document: dict[str, Any]) -> FineTuneJob:
    job = parse(mutated(mutated(document, "metadata.namespace", "ml"), "metadata.uid", "job-uid"))
    assert isinstance(job, FineTuneJob)
    return job


def deployment_of(document: dict[str, Any]) -> ModelDeployment:
    deployment = parse(mutated(mutated(document, "metadata.namespace", "ml"), "metadata.uid", "md-uid"))
    assert isinstance(deployment, ModelDeployment)
    return deployment


def namespace(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def ports(*numbers: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": number} for number in numbers]


# (settings, the KubeRay rule's peer or None, the metrics scraper's peer or None)
PEERS = [
    pytest.param(Settings(), {**namespace("kuberay-system"), "podSelector": {"matchLabels": KUBERAY_LABELS}}, None,
                 id="defaults: KubeRay from kuberay-system only, no scraper"),
    pytest.param(Settings(kuberay_namespace="ray-operators", kuberay_operator_labels="app=kuberay,tier=ctl"),
                 {**namespace("ray-operators"), "podSelector": {"matchLabels": {"app": "kuberay", "tier": "ctl"}}},
                 None, id="KubeRay's namespace and labels from the settings"),
    pytest.param(Settings(kuberay_namespace=""), {"podSelector": {"matchLabels": KUBERAY_LABELS}}, None,
                 id="no KubeRay namespace: a KubeRay in the cluster's own namespace"),
    pytest.param(Settings(kuberay_operator_labels=""), None, None, id="no KubeRay labels: no KubeRay rule"),
    pytest.param(Settings(ray_metrics_namespace="monitoring"),
                 {**namespace("kuberay-system"), "podSelector": {"matchLabels": KUBERAY_LABELS}},
                 {**namespace("monitoring"), "podSelector": {}}, id="every pod of the monitoring namespace scrapes"),
    pytest.param(Settings(ray_metrics_namespace="monitoring", ray_metrics_pod_labels="app=prometheus"),
                 {**namespace("kuberay-system"), "podSelector": {"matchLabels": KUBERAY_LABELS}},
                 {**namespace("monitoring"), "podSelector": {"matchLabels": {"app": "prometheus"}}},
                 id="Prometheus pods of the monitoring namespace scrape"),
    pytest.param(Settings(ray_metrics_pod_labels="app=prometheus"),
                 {**namespace("kuberay-system"), "podSelector": {"matchLabels": KUBERAY_LABELS}},
                 {"podSelector": {"matchLabels": {"app": "prometheus"}}},
                 id="Prometheus pods of the cluster's own namespace scrape"),
]  # fmt: skip


@pytest.mark.parametrize(("settings", "kuberay", "scraper"), PEERS)
def test_a_runs_cluster_admits_its_own_pods_kuberay_and_the_scraper(
    minimal_job: dict[str, Any], settings: Settings, kuberay: dict[str, Any] | None, scraper: dict[str, Any] | None
) -> None:
    policy = build_run(job_of(minimal_job), REQUEST, settings).network_policy
    assert policy == build_run_network_policy(job_of(minimal_job), REQUEST.number, settings)
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "job-uid"
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": RUN_PODS} and spec["policyTypes"] == ["Ingress"]
    expected = [{"from": [{"podSelector": {"matchLabels": RUN_PODS}}]}]
    if kuberay is not None:
        expected.append({"from": [kuberay], "ports": ports(8265, 52365)})
    if scraper is not None:
        expected.append({"from": [scraper], "ports": ports(8080)})  # a run runs no HAProxy
    assert spec["ingress"] == expected


@pytest.mark.parametrize(("settings", "kuberay", "scraper"), PEERS)
def test_an_endpoints_cluster_admits_the_same_and_clients_on_serves_port(
    deployment: dict[str, Any], settings: Settings, kuberay: dict[str, Any] | None, scraper: dict[str, Any] | None
) -> None:
    spec = build_network_policy(deployment_of(deployment), settings)["spec"]
    expected = [{"from": [{"podSelector": {"matchLabels": ENDPOINT_PODS}}]}]
    if kuberay is not None:
        expected.append({"from": [kuberay], "ports": ports(8265, 52365)})
    if scraper is not None:
        expected.append({"from": [scraper], "ports": ports(8080, 9101)})  # Ray's metrics and HAProxy's
    expected.append({"ports": ports(8000)})  # Serve's HTTP, from anywhere
    assert spec["ingress"] == expected


def test_no_rule_admits_any_namespace(minimal_job: dict[str, Any], deployment: dict[str, Any]) -> None:
    """An empty namespaceSelector ({}) would admit the labelled pods of every namespace."""
    for settings in [Settings(), Settings(kuberay_namespace=""), Settings(ray_metrics_pod_labels="a=b")]:
        policies = [build_run(job_of(minimal_job), REQUEST, settings).network_policy,
                    build_network_policy(deployment_of(deployment), settings)]  # fmt: skip
        peers = [peer for policy in policies for rule in policy["spec"]["ingress"] for peer in rule.get("from", [])]
        assert all(peer.get("namespaceSelector", {"x": 1}) for peer in peers)


@pytest.mark.parametrize(("auth", "expected"), [(True, {"mode": "token"}), (False, None)])
def test_token_authentication_on_runs_and_endpoints(
    minimal_job: dict[str, Any], deployment: dict[str, Any], auth: bool, expected: dict[str, str] | None
) -> None:
    settings = Settings(kuberay_auth_options=auth)
    run = build_run(job_of(minimal_job), REQUEST, settings).ray_job["spec"]["rayClusterSpec"]
    endpoint = build_ray_service(deployment_of(deployment), SERVED, settings)["spec"]["rayClusterConfig"]
    assert run.get("authOptions") == expected and endpoint.get("authOptions") == expected


def test_token_authentication_is_on_by_default() -> None:
    assert Settings().kuberay_auth_options is True
    assert Settings.from_environment({}).kuberay_auth_options is True


def test_turning_authentication_on_changes_the_endpoints_cluster(deployment: dict[str, Any]) -> None:
    """The RayService's hash changes with it, so an endpoint made without auth is rolled onto a new cluster."""
    model = deployment_of(deployment)
    hashes = {
        auth: build_ray_service(model, SERVED, Settings(kuberay_auth_options=auth))["metadata"]["annotations"]
        for auth in (True, False)
    }
    assert hashes[True] != hashes[False]


@pytest.mark.parametrize(
    ("environment", "namespace", "labels", "scraped"),
    [
        ({}, "", {}, False),
        ({"KUBETUNE_RAY_METRICS_NAMESPACE": "monitoring"}, "monitoring", {}, True),
        ({"KUBETUNE_RAY_METRICS_POD_LABELS": "app=prometheus, release=kp"}, "", {"app": "prometheus",
                                                                                  "release": "kp"}, True),
    ],
)  # fmt: skip
def test_the_metrics_scraper_from_the_environment(
    environment: dict[str, str], namespace: str, labels: dict[str, str], scraped: bool
) -> None:
    settings = Settings.from_environment(environment)
    assert settings.ray_metrics_namespace == namespace and settings.ray_metrics_pod_selector == labels
    assert settings.ray_metrics_scraped is scraped


def test_kuberays_namespace_from_the_environment() -> None:
    assert Settings().kuberay_namespace == "kuberay-system"
    assert Settings.from_environment({"KUBETUNE_KUBERAY_NAMESPACE": "ray"}).kuberay_namespace == "ray"
