"""The FineTuneJob operator against a real API server; the tests play KubeRay by patching RayJob status."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes.client
import pytest
from kubetune.operator.kube import Kube, ObjectRef
from kubetune.operator.naming import run_labels
from kubetune.runtime.contract.report import REPORT_KEY, RunReport, Stage, VariantReport
from kubetune.runtime.contract.runconfig import RunConfig
from kubetune.runtime.reporting.base import TrainingProgress
from kubetune.runtime.reporting.kube_reporter import MERGE_PATCH, ConfigMapReporter, config_map_api

from ..conftest import load_example, mutated
from ..controlplane import CommandError, ControlPlane
from ..plans import DOES_NOT_FIT, FITS
from .harness import (
    EXAMPLE_RUNS,
    InProcessOperator,
    MovableClock,
    conditions,
    create_secret,
    eventually,
    set_ray_job_status,
    write_plan,
)

Manifest = dict[str, Any]
JOB = ("kubetune.io/v1alpha1", "FineTuneJob")
FITTING_PLAN, OVERSIZED_PLAN = FITS, DOES_NOT_FIT
SUCCEEDED = {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}
RUNNING = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}


def create_job(kube: Kube, namespace: str, name: str = "tickets", **edits: Any) -> Manifest:
    document = mutated(load_example("finetunejob-minimal.yaml"), "metadata.name", name)
    for path, value in edits.items():
        document = mutated(document, path.replace("__", "."), value)
    created = kube.create({**document, "metadata": {**document["metadata"], "namespace": namespace}})
    assert created is not None
    return created


def job(kube: Kube, namespace: str, name: str = "tickets") -> Manifest:
    body = kube.get(*JOB, namespace, name)
    assert body is not None
    return body


def status(kube: Kube, namespace: str, name: str = "tickets") -> Manifest:
    return job(kube, namespace, name).get("status") or {}


def ray_jobs(kube: Kube, namespace: str) -> list[str]:
    return sorted(item["metadata"]["name"] for item in kube.list("ray.io/v1", "RayJob", namespace, {}))


def wait_phase(kube: Kube, namespace: str, phase: str, name: str = "tickets", run: int | None = None) -> Manifest:
    def probe() -> Manifest | None:
        current = status(kube, namespace, name)
        if current.get("phase") != phase:
            return None
        if run is not None and (not current.get("runs") or current["runs"][-1]["number"] != run):
            return None
        return current

    return eventually(probe, what=f"{name} phase {phase} (run {run})")


def wait_ray_job(kube: Kube, namespace: str, name: str) -> Manifest:
    return eventually(lambda: kube.get("ray.io/v1", "RayJob", namespace, name), timeout=60, what=f"RayJob {name}")


def events(kube: Kube, namespace: str) -> list[tuple[str, str]]:
    items = kube.request("GET", f"/api/v1/namespaces/{namespace}/events").get("items", [])
    return [(item["reason"], item["message"]) for item in items]


def wait_event(kube: Kube, namespace: str, reason: str) -> str:
    found = eventually(
        lambda: [message for r, message in events(kube, namespace) if r == reason], what=f"event {reason}"
    )
    return found[0]


def test_a_new_job_starts_one_run(kube: Kube, namespace: str, operator: InProcessOperator) -> None:
    created = create_job(kube, namespace, spec__resources={"workers": 2, "gpusPerWorker": 1})
    # A GPU run is planned first, by a Job without GPUs: no RayJob until its plan fits.
    plan_job = eventually(lambda: kube.get("batch/v1", "Job", namespace, "tickets-r1-plan"), what="the plan Job")
    [container] = plan_job["spec"]["template"]["spec"]["containers"]
    assert "kubetune.runtime.recipe.plan" in container["command"] and "nvidia.com/gpu" not in str(container)
    planning = wait_phase(kube, namespace, "Planning", run=1)
    assert planning["runs"][0]["message"].startswith("planning on CPU")
    assert kube.get("ray.io/v1", "RayJob", namespace, "tickets-r1") is None
    write_plan(kube, namespace, "tickets-r1", FITTING_PLAN)
    ray_job = wait_ray_job(kube, namespace, "tickets-r1")
    owner = ray_job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("FineTuneJob", "tickets", created["metadata"]["uid"])
    assert owner["controller"] is True
    spec = ray_job["spec"]
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
    assert "kubetune.runtime.recipe.finetune" in spec["entrypoint"]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 2
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    config = kube.get("v1", "ConfigMap", namespace, "tickets-r1-config")
    assert config is not None
    run_config = json.loads(config["data"]["run.json"])
    assert run_config["run"]["reportConfigMap"] == "tickets-r1-report"
    assert run_config["spec"]["model"]["uri"] == "hf://sentence-transformers/all-MiniLM-L6-v2"
    for kind, name in [("ServiceAccount", "tickets-r1-runner"), ("ConfigMap", "tickets-r1-report")]:
        assert kube.get("v1", kind, namespace, name) is not None
    role = kube.get("rbac.authorization.k8s.io/v1", "Role", namespace, "tickets-r1-runner")
    assert role is not None and role["rules"][0]["resourceNames"] == ["tickets-r1-report"]

    current = wait_phase(kube, namespace, "Pending", run=1)
    assert current["observedGeneration"] == 1 and current["currentRun"] == 1
    progressing = conditions(job(kube, namespace))["Progressing"]
    assert progressing["status"] == "True" and progressing["observedGeneration"] == 1
    assert progressing["lastTransitionTime"]
    assert "run 1 (tickets-r1) started" in wait_event(kube, namespace, "RunCreated")
    assert ray_jobs(kube, namespace) == ["tickets-r1"]
    assert current["runs"][0]["plan"]["memoryPerDeviceBytes"] == FITTING_PLAN.memory_per_device_bytes
    assert current["runs"][0]["message"].startswith("planned: 12 GiB per GPU of 80 on H100-SXM")


def test_a_gpu_run_whose_plan_does_not_fit_fails_before_its_rayjob(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    create_job(kube, namespace, spec__resources={"gpusPerWorker": 1, "gpuType": "NVIDIA-L4"})
    wait_phase(kube, namespace, "Planning", run=1)
    write_plan(kube, namespace, "tickets-r1", OVERSIZED_PLAN)
    failed = wait_phase(kube, namespace, "Failed", run=1)
    [run] = failed["runs"]
    assert (run["failure"], run["message"]) == ("InvalidSpec", OVERSIZED_PLAN.message)
    assert run["plan"]["fits"] is False and run["gate"]["passed"] is False
    assert conditions(job(kube, namespace))["Degraded"]["reason"] == "InvalidSpec"
    assert str(OVERSIZED_PLAN.message) in wait_event(kube, namespace, "RunFailed")
    assert ray_jobs(kube, namespace) == []


def test_success_with_a_report_is_mirrored_and_promoted(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    set_ray_job_status(kube, namespace, "tickets-r1", **RUNNING)
    wait_phase(kube, namespace, "Running")
    report = RunReport(stage=Stage.TRAIN, step=40, total_steps=100, epoch=1.2, loss=0.61)
    write_report(kube, namespace, "tickets-r1-report", report)
    progress = eventually(
        lambda: (status(kube, namespace).get("runs") or [{}])[-1].get("progress", {}).get("step") == 40,
        what="progress step 40 in status",
    )
    assert progress
    final = RunReport(
        stage=Stage.DONE,
        metrics_before={"accuracy": 0.31, "macroF1": 0.2},
        metrics_after={"accuracy": 0.88, "macroF1": 0.86},
        variants={"merged": VariantReport(uri=f"{EXAMPLE_RUNS}/1/merged", metrics={"accuracy": 0.88})},
        best_variant="merged",
        manifest_uri=f"{EXAMPLE_RUNS}/1/kubetune.json",
        best_hyperparameters={"learningRate": 0.0003},
    )
    write_report(kube, namespace, "tickets-r1-report", final)
    set_ray_job_status(kube, namespace, "tickets-r1", **SUCCEEDED)
    current = wait_phase(kube, namespace, "Succeeded")
    run = current["runs"][-1]
    assert run["metricsAfter"]["accuracy"] == 0.88 and run["artifacts"] == {"merged": f"{EXAMPLE_RUNS}/1/merged"}
    assert run["rayJob"]["jobStatus"] == "SUCCEEDED" and run["completionTime"]
    assert run["bestHyperparameters"] == {"learningRate": 0.0003}
    assert run["promotable"] is True and current["promotedRun"] == 1
    state = conditions(job(kube, namespace))
    assert state["Succeeded"]["status"] == "True" and state["Progressing"]["status"] == "False"
    assert state["Ready"]["status"] == "True"
    assert "gate: passed" in wait_event(kube, namespace, "RunSucceeded")

    # KubeRay may delete a finished RayJob: the final child status stays in ours.
    kube.delete(ObjectRef("ray.io/v1", "RayJob", namespace, "tickets-r1"))
    eventually(lambda: "tickets-r1" not in ray_jobs(kube, namespace), what="RayJob deleted")
    kube.patch(ObjectRef(*JOB, namespace, "tickets"), {"metadata": {"labels": {"touched": "yes"}}})
    current = eventually(
        lambda: (s := status(kube, namespace)).get("phase") == "Succeeded" and s, what="status after delete"
    )
    assert current["runs"][-1]["rayJob"]["jobDeploymentStatus"] == "Complete"


def runner_token(kube: Kube, namespace: str, run: str) -> str:
    """What a run's pod would mount: a token of the run's own ServiceAccount."""
    answer = kube.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{run}-runner/token",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )
    return str(answer["status"]["token"])


def runner_api(kube: Kube, namespace: str, run: str) -> kubernetes.client.CoreV1Api:
    """The client a run's reporter writes through, with the run's own token (as in its pod)."""
    configuration = kubernetes.client.Configuration(host=kube.server, ssl_ca_cert=kube.configuration.ssl_ca_cert)
    configuration.api_key = {"BearerToken": runner_token(kube, namespace, run)}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return config_map_api(configuration)


def write_report(kube: Kube, namespace: str, name: str, report: RunReport) -> None:
    kube.patch(ObjectRef("v1", "ConfigMap", namespace, name), {"data": {REPORT_KEY: report.model_dump_json()}})


def test_failures_and_retries_show_in_status(kube: Kube, namespace: str, operator: InProcessOperator) -> None:
    create_job(kube, namespace, name="flaky")
    create_job(kube, namespace, name="broken")
    create_job(kube, namespace, name="stopped")
    for name in ("flaky-r1", "broken-r1", "stopped-r1"):
        wait_ray_job(kube, namespace, name)
    set_ray_job_status(kube, namespace, "flaky-r1", jobStatus="FAILED", jobDeploymentStatus="Retrying", failed=1)
    set_ray_job_status(
        kube, namespace, "broken-r1", jobDeploymentStatus="ValidationFailed", reason="ValidationFailed",
        message="invalid RayJob spec",
    )  # fmt: skip
    set_ray_job_status(kube, namespace, "stopped-r1", jobStatus="STOPPED", jobDeploymentStatus="Complete")
    retrying = wait_phase(kube, namespace, "Retrying", name="flaky")
    assert retrying["runs"][-1]["rayJob"]["failed"] == 1
    broken = wait_phase(kube, namespace, "Failed", name="broken")
    assert "invalid RayJob spec" in broken["runs"][-1]["message"]
    wait_phase(kube, namespace, "Failed", name="stopped")
    failed = conditions(job(kube, namespace, "broken"))["Failed"]
    assert failed["status"] == "True" and failed["observedGeneration"] == 1
    assert conditions(job(kube, namespace, "broken"))["Degraded"]["status"] == "True"
    wait_event(kube, namespace, "RunRetrying")
    wait_event(kube, namespace, "RunFailed")
    # A retry that then succeeds ends as a success.
    set_ray_job_status(kube, namespace, "flaky-r1", **SUCCEEDED)
    wait_phase(kube, namespace, "Succeeded", name="flaky")


def test_a_run_that_fails_its_own_checks_is_not_retried(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    create_job(kube, namespace, name="gpu-less")
    create_job(kube, namespace, name="slow")
    wait_ray_job(kube, namespace, "gpu-less-r1")
    wait_ray_job(kube, namespace, "slow-r1")
    report = RunReport(
        stage=Stage.FAILED,
        error="GPUs were requested but this node has no CUDA GPU",
        invalid_field="resources.gpusPerWorker",
    )
    write_report(kube, namespace, "gpu-less-r1-report", report)
    set_ray_job_status(kube, namespace, "gpu-less-r1", jobStatus="FAILED", jobDeploymentStatus="Retrying", failed=1)
    failed = wait_phase(kube, namespace, "Failed", name="gpu-less")
    assert failed["runs"][-1]["failure"] == "InvalidSpec"
    assert failed["runs"][-1]["message"].startswith("spec.resources.gpusPerWorker: GPUs were requested")
    # Stopped, so that KubeRay does not start it again backoffLimit times.
    eventually(lambda: "gpu-less-r1" not in ray_jobs(kube, namespace), what="the RayJob deleted")
    assert conditions(job(kube, namespace, "gpu-less"))["Degraded"]["reason"] == "InvalidSpec"
    set_ray_job_status(
        kube, namespace, "slow-r1", jobDeploymentStatus="Failed", reason="DeadlineExceeded",
        message="The RayJob has passed the activeDeadlineSeconds.",
    )  # fmt: skip
    slow = wait_phase(kube, namespace, "Failed", name="slow")
    assert slow["runs"][-1]["failure"] == "DeadlineExceeded"
    assert conditions(job(kube, namespace, "slow"))["Degraded"]["reason"] == "DeadlineExceeded"
    assert "slow-r1" in ray_jobs(kube, namespace)  # KubeRay's own failure: nothing to stop


HUB_DOWN = (
    "model.uri: cannot reach the model hub at http://hf-mirror.models.svc:8080 for hf://org/model "
    "(Connection refused), and the Hugging Face cache at /home/ray/.cache/huggingface/hub does not hold it"
)


def test_an_unreachable_model_hub_is_retried_within_the_backoff_limit(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    create_job(kube, namespace, name="hubless")
    wait_ray_job(kube, namespace, "hubless-r1")
    set_ray_job_status(kube, namespace, "hubless-r1", **RUNNING)
    wait_phase(kube, namespace, "Running", name="hubless")
    unavailable = RunReport(stage=Stage.FAILED, error=HUB_DOWN, unavailable="ModelHub")
    write_report(kube, namespace, "hubless-r1-report", unavailable)
    set_ray_job_status(kube, namespace, "hubless-r1", jobStatus="FAILED", jobDeploymentStatus="Retrying", failed=1)
    retrying = wait_phase(kube, namespace, "Retrying", name="hubless")
    assert retrying["runs"][-1]["message"] == HUB_DOWN and "failure" not in retrying["runs"][-1]
    assert HUB_DOWN in conditions(job(kube, namespace, "hubless"))["Progressing"]["message"]
    assert "http://hf-mirror.models.svc:8080" in wait_event(kube, namespace, "RunRetrying")
    assert "hubless-r1" in ray_jobs(kube, namespace)  # not stopped: KubeRay runs it again
    # The next try starts, then fails the same way; KubeRay's retries are spent.
    set_ray_job_status(kube, namespace, "hubless-r1", **RUNNING)
    write_report(kube, namespace, "hubless-r1-report", RunReport(stage=Stage.LOAD, message="data from s3://"))
    wait_phase(kube, namespace, "Running", name="hubless")
    write_report(kube, namespace, "hubless-r1-report", unavailable)
    set_ray_job_status(
        kube, namespace, "hubless-r1", jobStatus="FAILED", jobDeploymentStatus="Failed", reason="AppFailed", failed=3
    )
    failed = wait_phase(kube, namespace, "Failed", name="hubless")
    assert (failed["runs"][-1]["failure"], failed["runs"][-1]["message"]) == ("ModelUnavailable", HUB_DOWN)
    degraded = conditions(job(kube, namespace, "hubless"))["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "ModelUnavailable")
    assert failed["runs"][-1]["rayJob"]["jobDeploymentStatus"] == "Failed"


def test_a_stopped_runs_record_does_not_say_it_is_running(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    create_job(kube, namespace, name="gpu-less")
    wait_ray_job(kube, namespace, "gpu-less-r1")
    set_ray_job_status(kube, namespace, "gpu-less-r1", **RUNNING, message="Job is currently running.")
    wait_phase(kube, namespace, "Running", name="gpu-less")
    report = RunReport(stage=Stage.FAILED, error="no CUDA GPU", invalid_field="resources.gpusPerWorker")
    write_report(kube, namespace, "gpu-less-r1-report", report)  # the RayJob still says Running
    failed = wait_phase(kube, namespace, "Failed", name="gpu-less")
    eventually(lambda: "gpu-less-r1" not in ray_jobs(kube, namespace), what="the RayJob deleted")
    record = status(kube, namespace, "gpu-less")["runs"][-1]
    assert record["failure"] == "InvalidSpec" and record == failed["runs"][-1]
    ray_job = record["rayJob"]
    assert ray_job["name"] == "gpu-less-r1" and not {"jobStatus", "jobDeploymentStatus"} & set(ray_job)
    assert ray_job["message"] == "stopped before KubeRay ended it (last seen: Running, job RUNNING)"


def test_spec_edit_starts_a_new_run(kube: Kube, namespace: str, operator: InProcessOperator) -> None:
    create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    set_ray_job_status(kube, namespace, "tickets-r1", **SUCCEEDED)
    wait_phase(kube, namespace, "Succeeded", run=1)
    # Editing what is not run-relevant (the history limit) starts nothing.
    kube.patch(ObjectRef(*JOB, namespace, "tickets"), {"spec": {"historyLimit": 5}})
    eventually(lambda: status(kube, namespace).get("observedGeneration") == 2, what="generation 2 observed")
    kube.patch(ObjectRef(*JOB, namespace, "tickets"), {"spec": {"hyperparameters": {"learningRate": 0.001}}})
    current = wait_phase(kube, namespace, "Pending", run=2)
    assert current["runs"][-1]["trigger"] == "SpecChange" and current["runs"][-1]["specGeneration"] == 3
    assert ray_jobs(kube, namespace) == ["tickets-r1", "tickets-r2"]
    config = kube.get("v1", "ConfigMap", namespace, "tickets-r2-config")
    assert config is not None and json.loads(config["data"]["run.json"])["spec"]["hyperparameters"]["learningRate"]


def test_retrain_annotation_starts_a_run_once(kube: Kube, namespace: str, operator: InProcessOperator) -> None:
    create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    set_ray_job_status(kube, namespace, "tickets-r1", **SUCCEEDED)
    wait_phase(kube, namespace, "Succeeded", run=1)
    annotate(kube, namespace, "tickets", "2026-11-29")
    current = wait_phase(kube, namespace, "Pending", run=2)
    assert (current["runs"][-1]["trigger"], current["runs"][-1]["triggerDetail"]) == ("Annotation", "2026-11-29")
    assert current["handledRetrain"] == "2026-11-29"
    set_ray_job_status(kube, namespace, "tickets-r2", **SUCCEEDED)
    wait_phase(kube, namespace, "Succeeded", run=2)
    # The same value again (any other change to the object) is not a new trigger.
    kube.patch(ObjectRef(*JOB, namespace, "tickets"), {"metadata": {"labels": {"team": "support"}}})
    annotate(kube, namespace, "tickets", "2026-11-29")
    eventually(lambda: job(kube, namespace)["metadata"]["labels"].get("team"), what="label")
    assert ray_jobs(kube, namespace) == ["tickets-r1", "tickets-r2"]


def annotate(kube: Kube, namespace: str, name: str, value: str) -> None:
    kube.patch(ObjectRef(*JOB, namespace, name), {"metadata": {"annotations": {"kubetune.io/retrain": value}}})


def test_schedule_starts_a_run_when_due(
    kube: Kube, namespace: str, operator: InProcessOperator, clock: MovableClock
) -> None:
    # The operator's clock is moved to 4 s before the top of an hour; "0 * * * *" is then due.
    top = (datetime.now(UTC) + timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
    clock.set(top - timedelta(seconds=4))
    create_job(kube, namespace, spec__schedule="0 * * * *", spec__concurrencyPolicy="Queue")
    wait_ray_job(kube, namespace, "tickets-r1")
    set_ray_job_status(kube, namespace, "tickets-r1", **SUCCEEDED)
    current = wait_phase(kube, namespace, "Pending", run=2)
    run = current["runs"][-1]
    assert run["trigger"] == "Schedule" and run["triggerDetail"] == top.isoformat()
    assert current["lastScheduleTime"].startswith(top.strftime("%Y-%m-%dT%H:%M"))


def test_concurrency_policies(kube: Kube, namespace: str, operator: InProcessOperator) -> None:
    for name, policy in [("forbid", "Forbid"), ("replace", "Replace"), ("queue", "Queue")]:
        create_job(kube, namespace, name=name, spec__concurrencyPolicy=policy)
    for name in ("forbid", "replace", "queue"):
        wait_ray_job(kube, namespace, f"{name}-r1")
        set_ray_job_status(kube, namespace, f"{name}-r1", **RUNNING)
        wait_phase(kube, namespace, "Running", name=name)
        annotate(kube, namespace, name, "now")

    # Forbid: the trigger is dropped while run 1 is active, and says so.
    assert "concurrencyPolicy is Forbid" in wait_event(kube, namespace, "TriggerSkipped")
    eventually(lambda: status(kube, namespace, "forbid").get("handledRetrain") == "now", what="forbid handled")
    # Replace: run 1 is stopped (its RayJob deleted) and run 2 starts.
    replaced = wait_phase(kube, namespace, "Pending", name="replace", run=2)
    assert replaced["runs"][0]["phase"] == "Failed" and "replaced" in replaced["runs"][0]["message"]
    eventually(lambda: kube.get("ray.io/v1", "RayJob", namespace, "replace-r1") is None, what="replace-r1 deleted")
    # Queue: run 2 waits for run 1.
    assert kube.get("ray.io/v1", "RayJob", namespace, "queue-r2") is None
    set_ray_job_status(kube, namespace, "queue-r1", **SUCCEEDED)
    queued = wait_phase(kube, namespace, "Pending", name="queue", run=2)
    assert queued["runs"][-1]["trigger"] == "Annotation"

    set_ray_job_status(kube, namespace, "forbid-r1", **SUCCEEDED)
    wait_phase(kube, namespace, "Succeeded", name="forbid")
    assert [n for n in ray_jobs(kube, namespace) if n.startswith("forbid")] == ["forbid-r1"]


def test_deleting_the_job_removes_its_children(
    control_plane: ControlPlane, kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    if not control_plane.garbage_collection:
        pytest.skip("no garbage collector runs here (KUBEBUILDER_ASSETS holds no kube-controller-manager)")
    create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    children = [
        ("ray.io/v1", "RayJob", "tickets-r1"),
        ("v1", "ConfigMap", "tickets-r1-config"),
        ("v1", "ConfigMap", "tickets-r1-report"),
        ("v1", "ServiceAccount", "tickets-r1-runner"),
        ("rbac.authorization.k8s.io/v1", "Role", "tickets-r1-runner"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding", "tickets-r1-runner"),
    ]
    kube.delete(ObjectRef(*JOB, namespace, "tickets"))
    for api_version, kind, name in children:
        wait_gone(kube, namespace, api_version, kind, name)


def wait_gone(kube: Kube, namespace: str, api_version: str, kind: str, name: str) -> None:
    eventually(lambda: kube.get(api_version, kind, namespace, name) is None, timeout=60, what=f"{kind} {name} gone")


def run_pod(kube: Kube, namespace: str, name: str, job_name: str = "tickets", number: int = 1) -> ObjectRef:
    """A pod of a run's Ray cluster, as KubeRay makes it from our template (labels included)."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": run_labels(job_name, number)},
        "spec": {"containers": [{"name": "ray-head", "image": "kubetune-runtime:test"}]},
    }
    assert kube.create(pod) is not None
    return ObjectRef("v1", "Pod", namespace, name)


def container_status(**state: Any) -> Manifest:
    return {"name": "ray-head", "image": "kubetune-runtime:test", "imageID": "", "ready": False, "restartCount": 0,
            "state": state}  # fmt: skip


def test_a_missing_secret_shows_on_the_run_as_pod_config_error(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    # The operator holds no grant on Secrets: the run starts, and its pods say what is missing.
    create_job(kube, namespace, spec__storage={"credentialsSecret": {"name": "storage-keys"}})
    ray_job = wait_ray_job(kube, namespace, "tickets-r1")
    container = ray_job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "storage-keys"}}]
    head = run_pod(kube, namespace, "tickets-r1-head-x7k2p")
    missing = {"reason": "CreateContainerConfigError", "message": 'secret "storage-keys" not found'}
    kube.patch_status(head, {"containerStatuses": [container_status(waiting=missing)]})
    progressing = eventually(
        lambda: (c := conditions(job(kube, namespace)).get("Progressing")) and c["reason"] == "PodConfigError" and c,
        what="Progressing PodConfigError",
    )
    assert 'secret "storage-keys" not found' in progressing["message"]
    (run,) = status(kube, namespace)["runs"]
    assert run["waiting"] == "PodConfigError" and "tickets-r1-head-x7k2p" in run["message"]
    # Once the Secret exists the kubelet starts the container, and nothing holds the run up.
    keys = {"AWS_ACCESS_KEY_ID": "key-id-7431", "AWS_SECRET_ACCESS_KEY": "key-secret-9925"}
    create_secret(kube, namespace, "storage-keys", keys)
    kube.patch_status(head, {"containerStatuses": [{**container_status(running={}), "ready": True}]})
    eventually(lambda: "waiting" not in status(kube, namespace)["runs"][0], what="the run no longer waits")
    # Credentials travel by reference only.
    everything = json.dumps([ray_job, status(kube, namespace), kube.list("v1", "ConfigMap", namespace, {})])
    assert "key-id-7431" not in everything and "key-secret-9925" not in everything


def test_the_run_may_write_its_report_and_nothing_more(
    control_plane: ControlPlane, kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    runner = f"--as=system:serviceaccount:{namespace}:tickets-r1-runner"

    def can(verb: str, resource: str) -> bool:
        try:
            control_plane.kubectl("auth", "can-i", verb, resource, "-n", namespace, runner)
        except CommandError:
            return False  # kubectl exits 1 for "no"
        return True

    assert can("patch", "configmap/tickets-r1-report")
    # Only the verb the reporter uses (runtime/reporting/kube_reporter.py): no read, no replace.
    assert not can("get", "configmap/tickets-r1-report") and not can("update", "configmap/tickets-r1-report")
    assert not can("patch", "configmap/tickets-r1-config")
    assert not can("get", "secrets") and not can("create", "rayjobs.ray.io")
    assert not can("patch", "finetunejobs.kubetune.io/tickets")


def test_the_runtime_reporter_writes_progress_with_the_runs_token(
    control_plane: ControlPlane, kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    config_map = kube.get("v1", "ConfigMap", namespace, "tickets-r1-config")
    assert config_map is not None
    identity = RunConfig.model_validate_json(config_map["data"]["run.json"]).run
    patcher = runner_api(kube, namespace, "tickets-r1")
    assert identity.report_config_map and identity.namespace
    reporter = ConfigMapReporter(patcher, identity.report_config_map, identity.namespace, min_interval_s=0)
    reporter.stage_started(Stage.TRAIN, "training on 2 workers")
    reporter.progress(TrainingProgress(step=7, total_steps=20, epoch=0.35, loss=1.25, learning_rate=1e-4))
    progress = eventually(
        lambda: (
            (status(kube, namespace).get("runs") or [{}])[-1].get("progress", {}).get("step") == 7
            and status(kube, namespace)["runs"][-1]["progress"]
        ),
        what="progress in status",
    )
    assert progress["stage"] == "train" and progress["totalSteps"] == 20 and progress["loss"] == 1.25
    # The token opens this one object and nothing else.
    with pytest.raises(kubernetes.client.ApiException) as refused:
        patcher.patch_namespaced_config_map(
            "tickets-r1-config", namespace, {"data": {"run.json": "{}"}}, _content_type=MERGE_PATCH
        )
    assert refused.value.status == 403
