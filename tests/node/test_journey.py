"""The user's journey on a real node, in order: install, train, serve, autoscale, retrain and roll out, roll back.

Each step needs the ones before it; a step whose prerequisite failed is skipped with
the reason. The figures each step measures (seconds from `kubectl apply`) are printed
at the end of the session.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from .journey import (
    FIGURES,
    ClientLoop,
    Milestones,
    condition,
    describe,
    get,
    items,
    post,
    run_client_pod,
    service_url,
    wait_for,
)
from .stack import BUCKET, OPERATOR_NAMESPACE, TRAIN_KEY, Stack, example_manifests, prepare_namespace

NS = "journey"
JOB = DEPLOYMENT = "support-tickets"
SERVE_PORT = 8000
BILLING = "Why was I billed twice on my credit card this month?"
DELIVERY = "My parcel never arrived and the tracking page has not changed for a week"
TRAIN_V2_KEY = TRAIN_KEY.replace("train.jsonl", "train-v2.jsonl")


@dataclass
class Journey:
    """What the steps pass on: the manifests, the token, what was reached, and the figures."""

    job: dict[str, Any]
    deployment: dict[str, Any]
    token: str
    reached: set[str] = field(default_factory=set)
    figures: dict[str, Milestones] = field(default_factory=dict)

    def require(self, *steps: str) -> None:
        missing = [step for step in steps if step not in self.reached]
        if missing:
            pytest.skip(f"needs the step(s) before it: {', '.join(missing)}")


@pytest.fixture(scope="module")
def journey(stack: Stack) -> Iterator[Journey]:
    """A namespace of the journey's own (restricted, with the storage Secret), removed at the end."""
    stack.node.kubectl("delete", "namespace", NS, "--ignore-not-found", "--timeout=300s")
    prepare_namespace(stack, NS)
    token = uuid.uuid4().hex
    job, deployment, secret = example_manifests(stack, token)
    stack.apply(secret, namespace=NS)
    yield Journey(job, deployment, token, figures=FIGURES)
    stack.node.kubectl("delete", "namespace", NS, "--ignore-not-found", "--timeout=300s", check=False)


def _job(stack: Stack) -> dict[str, Any]:
    body = get(stack.node, "finetunejob", JOB, NS)
    assert body is not None
    return body


def _deployment(stack: Stack) -> dict[str, Any]:
    body = get(stack.node, "modeldeployment", DEPLOYMENT, NS)
    assert body is not None
    return body


def _predict_url(stack: Stack) -> str:
    return service_url(stack.node, NS, f"{DEPLOYMENT}-serve-svc", SERVE_PORT) + "/v1/predict"


def _labels(answer: Any) -> list[str]:
    return [prediction["label"] for prediction in answer["predictions"]]


def test_operator_runs_from_the_chart(stack: Stack, journey: Journey) -> None:
    node = stack.node
    [pod] = items(node, "pods", OPERATOR_NAMESPACE, "app.kubernetes.io/name=kubetune")
    spec, status = pod["spec"], pod["status"]
    assert spec["serviceAccountName"] == "kubetune"
    assert spec["containers"][0]["image"] == stack.images["operator"].name
    assert condition(pod, "Ready").get("status") == "True", status
    namespace = get(node, "namespace", OPERATOR_NAMESPACE, "")
    assert namespace is not None
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The process runs as the image's user, on a read-only root filesystem.
    uid = node.kubectl("exec", "-n", OPERATOR_NAMESPACE, pod["metadata"]["name"], "--", "python", "-c",
                       "import os; print(os.getuid()); open('/probe', 'w')", check=False)  # fmt: skip
    assert uid.stdout.split()[0] == "65532" and "Read-only file system" in uid.stderr
    journey.reached.add("operator")


def test_a_gpu_run_that_cannot_fit_is_refused_by_its_plan_pod(stack: Stack, journey: Journey) -> None:
    """The plan pod (the runtime image, on CPU) reads the model's config.json and refuses the run before a
    RayJob exists: a LoRA batch of 65,536 sequences of 512 tokens does not fit a T4."""
    journey.require("operator")
    node = stack.node
    clock = FIGURES["GPU run apply → refused by its plan"] = Milestones()
    job = json.loads(json.dumps(journey.job))
    job["metadata"]["name"] = "too-big"
    job["spec"]["resources"] = {**job["spec"]["resources"], "gpusPerWorker": 1, "gpuType": "Tesla-T4"}
    job["spec"]["hyperparameters"] = {**job["spec"]["hyperparameters"], "batchSize": 65536, "maxSequenceLength": 512}
    stack.apply(job, namespace=NS)

    def refused() -> dict[str, Any] | None:
        body = get(node, "finetunejob", "too-big", NS)
        runs = ((body or {}).get("status") or {}).get("runs") or []
        if runs and runs[0]["phase"] == "Planning":
            clock.mark("Planning")
        return runs[0] if runs and runs[0]["phase"] == "Failed" else None

    run = wait_for(refused, timeout=300, what="the plan to refuse the run", diagnose=lambda: describe(node, NS))
    clock.mark("refused")
    assert run["failure"] == "InvalidSpec", run
    assert "T4" in run["message"] and "GiB" in run["message"], run["message"]
    plan = run["plan"]
    assert plan["fits"] is False and plan["gpu"] == "T4" and plan["memoryPerDeviceBytes"] > plan["deviceMemoryBytes"]
    assert get(node, "rayjob", "too-big-r1", NS) is None
    # The operator acts on the plan as soon as it is written, before the pod has exited.
    pod = wait_for(
        lambda: next(
            (p for p in items(node, "pods", NS, "job-name=too-big-r1-plan") if p["status"]["phase"] == "Succeeded"),
            None,
        ),
        timeout=120,
        what="the plan pod to succeed",
        diagnose=lambda: describe(node, NS),
    )
    assert "nvidia.com/gpu" not in json.dumps(pod["spec"]["containers"][0]["resources"])
    node.kubectl("delete", "finetunejob", "too-big", "-n", NS, "--wait=true", "--timeout=120s")
    wait_for(
        lambda: not items(node, "pods", NS, "kubetune.io/finetunejob=too-big"),
        timeout=120,
        what="the plan pod to go with its job",
    )


def test_a_finetunejob_trains_in_real_ray_pods(stack: Stack, journey: Journey) -> None:
    journey.require("operator")
    node = stack.node
    clock = FIGURES["FineTuneJob apply → Succeeded"] = Milestones()
    stack.apply(journey.job, namespace=NS)
    stages_seen: list[str] = []

    def progress() -> str | None:
        body = _job(stack)
        status = body.get("status") or {}
        for run in status.get("runs") or []:
            stage = ((run.get("progress") or {}).get("stage")) or ""
            if stage and stage not in stages_seen:
                stages_seen.append(stage)
                clock.mark(f"stage {stage}")
        ray_job = get(node, "rayjob", f"{JOB}-r1", NS)
        if ray_job is not None:
            clock.mark("RayJob created")
            if ((ray_job.get("status") or {}).get("rayClusterStatus") or {}).get("state") == "ready":
                clock.mark("RayCluster ready")
            if (ray_job.get("status") or {}).get("jobStatus") == "RUNNING":
                clock.mark("Ray job running")
        for pod in items(node, "pods", NS, f"kubetune.io/finetunejob={JOB}"):
            kind = pod["metadata"]["labels"].get("ray.io/node-type") or "submitter"
            if all(
                c.get("state", {}).get("running") for c in (pod.get("status") or {}).get("containerStatuses") or [{}]
            ):
                clock.mark(f"{kind} pod running")
        phase = status.get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_for(progress, timeout=1200, what="the FineTuneJob to finish", diagnose=lambda: describe(node, NS))
    clock.mark(f"FineTuneJob {phase}")
    status = _job(stack)["status"]
    assert phase == "Succeeded", json.dumps(status, indent=1)[-3000:]
    [run] = status["runs"]
    assert status["promotedRun"] == 1
    assert run["gate"]["passed"] is True
    assert run["metricsAfter"]["accuracy"] > run["metricsBefore"]["accuracy"]
    assert {"full", "merged", "int8"} <= set(run["artifacts"]), run["artifacts"]
    assert all(uri.startswith(f"s3://{BUCKET}/") for uri in run["artifacts"].values())
    # The status mirrored the run live, stage by stage, in pipeline order. Short stages (loading a model
    # the image carries takes about a second) may fall between two polls, so only training, which takes
    # minutes, must have been seen on its way.
    pipeline = ["load", "evaluate-base", "search", "train", "evaluate", "compress", "export", "done"]
    assert "train" in stages_seen and stages_seen[-1] == "done", stages_seen
    assert stages_seen == sorted(stages_seen, key=pipeline.index), stages_seen
    journey.reached.add("trained")


def test_a_modeldeployment_answers_with_its_token(stack: Stack, journey: Journey) -> None:
    journey.require("trained")
    node = stack.node
    clock = FIGURES["ModelDeployment apply → first answer"] = Milestones()
    stack.apply(journey.deployment, namespace=NS)

    def ready() -> bool:
        body = _deployment(stack)
        for pod in items(node, "pods", NS, f"kubetune.io/modeldeployment={DEPLOYMENT}"):
            if condition(pod, "Ready").get("status") == "True":
                clock.mark(f"{pod['metadata']['labels'].get('ray.io/node-type')} pod ready")
        if (body.get("status") or {}).get("applicationStatus") == "RUNNING":
            clock.mark("Serve application RUNNING")
        return condition(body, "Ready").get("status") == "True"

    wait_for(ready, timeout=600, what="the ModelDeployment to be Ready", diagnose=lambda: describe(node, NS))
    clock.mark("ModelDeployment Ready")
    # Every container of the head runs, the autoscaler (which talks to the API server) included.
    [head] = items(node, "pods", NS, f"kubetune.io/modeldeployment={DEPLOYMENT}", "ray.io/node-type=head")
    assert all(c["ready"] for c in head["status"]["containerStatuses"]), head["status"]["containerStatuses"]
    url = _predict_url(stack)
    answer = wait_for(lambda: (a := post(url, {"inputs": [BILLING, DELIVERY]}, journey.token)).status == 200 and a,
                      timeout=120, what="a first answer", interval=0.5)  # fmt: skip
    clock.mark("first answer")
    assert _labels(answer.body) == ["billing", "delivery"], answer.body
    assert post(url, {"inputs": [BILLING]}).status == 401
    # From a pod, by the Service's name in the cluster's DNS.
    script = (
        "import json, urllib.request as u\n"
        f"r = u.Request('http://{DEPLOYMENT}-serve-svc.{NS}.svc:{SERVE_PORT}/v1/predict', "
        f"json.dumps({{'inputs': [{BILLING!r}]}}).encode(), "
        f"{{'Content-Type': 'application/json', 'Authorization': 'Bearer {journey.token}'}})\n"
        "print(json.load(u.urlopen(r, timeout=60))['predictions'][0]['label'])\n"
    )
    assert run_client_pod(stack, NS, script).strip() == "billing"
    # Through `kubectl port-forward`, as a person would try it.
    forward = subprocess.Popen(
        [str(node.bin["kubectl"]), f"--kubeconfig={node.kubeconfig}", "port-forward", "-n", NS,
         f"svc/{DEPLOYMENT}-serve-svc", ":8000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert forward.stdout is not None
        port = re.search(r"127\.0\.0\.1:(\d+)", forward.stdout.readline())
        assert port, "kubectl port-forward printed no local port"
        forwarded = post(f"http://127.0.0.1:{port[1]}/v1/predict", {"inputs": [DELIVERY]}, journey.token)
        assert forwarded.status == 200 and _labels(forwarded.body) == ["delivery"], forwarded
    finally:
        forward.terminate()
        forward.wait(10)
    journey.reached.add("serving")


def _replica_pods(stack: Stack) -> list[dict[str, Any]]:
    pods = items(stack.node, "pods", NS, f"kubetune.io/modeldeployment={DEPLOYMENT}", "ray.io/node-type=worker")
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def test_load_adds_a_replica_pod_and_it_goes_again(stack: Stack, journey: Journey) -> None:
    journey.require("serving")
    up = FIGURES["autoscaling: load → 2nd replica serving"] = Milestones()
    url = _predict_url(stack)
    with ClientLoop(url, {"inputs": [BILLING, DELIVERY]}, journey.token, clients=8) as load:

        def two_serving() -> bool:
            pods = _replica_pods(stack)
            if len(pods) == 2:
                up.mark("2nd replica pod created")
            ready = [p for p in pods if condition(p, "Ready").get("status") == "True"]
            # KubeRay counts the pods with a Serve proxy: the head and each replica's pod.
            return len(ready) == 2 and _serving_pods(stack) == 3

        wait_for(two_serving, timeout=420, what="a second replica pod", diagnose=lambda: describe(stack.node, NS))
        up.mark("2 replicas serving")
        time.sleep(5)
    assert load.count() > 0
    down = FIGURES["autoscaling: load stops → back to 1 pod"] = Milestones()
    wait_for(lambda: len(_replica_pods(stack)) == 1, timeout=600, what="the replica pods to go back to 1",
             diagnose=lambda: describe(stack.node, NS))  # fmt: skip
    down.mark("1 replica pod")
    assert post(url, {"inputs": [BILLING]}, journey.token).status == 200
    journey.reached.add("autoscaled")


def _serving_pods(stack: Stack) -> int:
    return int((_deployment(stack).get("status") or {}).get("servingPods") or 0)


def test_retraining_rolls_out_the_new_run_without_a_failed_request(stack: Stack, journey: Journey) -> None:
    journey.require("serving")
    node = stack.node
    s3 = stack.s3()
    # New data: the same tickets in another order, under a new key.
    lines = s3.get_object(Bucket=BUCKET, Key=TRAIN_KEY)["Body"].read().decode().splitlines()
    s3.put_object(Bucket=BUCKET, Key=TRAIN_V2_KEY, Body="\n".join(reversed(lines)).encode())
    clock = FIGURES["retraining: data change → run 2 served"] = Milestones()
    url = _predict_url(stack)
    with ClientLoop(url, {"inputs": [BILLING]}, journey.token, pause=0.2) as steady:
        patch = {"spec": {"data": {"train": f"s3://{BUCKET}/{TRAIN_V2_KEY}"}}}
        node.kubectl("patch", "finetunejob", JOB, "-n", NS, "--type=merge", "-p", json.dumps(patch))
        wait_for(lambda: get(node, "rayjob", f"{JOB}-r2", NS), timeout=120, what="run 2's RayJob")
        clock.mark("run 2 started")
        # The operator's pod goes mid-run; the Deployment's next one picks the run up.
        [old] = items(node, "pods", OPERATOR_NAMESPACE, "app.kubernetes.io/name=kubetune")
        node.kubectl("delete", "pod", "-n", OPERATOR_NAMESPACE, old["metadata"]["name"], "--wait=false")

        def replaced() -> bool:
            pods = items(node, "pods", OPERATOR_NAMESPACE, "app.kubernetes.io/name=kubetune")
            return any(p["metadata"]["uid"] != old["metadata"]["uid"] and condition(p, "Ready").get("status") == "True"
                       for p in pods)  # fmt: skip

        wait_for(replaced, timeout=180, what="the operator's replacement pod")
        clock.mark("operator pod replaced")

        def promoted() -> bool:
            status = _job(stack).get("status") or {}
            if status.get("phase") == "Failed":
                raise AssertionError(f"run 2 failed: {json.dumps(status)[-2000:]}")
            return status.get("promotedRun") == 2

        wait_for(promoted, timeout=1200, what="run 2 to be promoted", diagnose=lambda: describe(node, NS))
        clock.mark("run 2 promoted")

        def serving_run_2() -> bool:
            status = _deployment(stack).get("status") or {}
            rolled = (status.get("serving") or {}).get("run") == 2 and not status.get("rolloutStartTime")
            return rolled and condition(_deployment(stack), "Ready").get("status") == "True"

        wait_for(serving_run_2, timeout=600, what="the endpoint to serve run 2", diagnose=lambda: describe(node, NS))
        clock.mark("run 2 served")
        time.sleep(3)
    rayjobs = [j["metadata"]["name"] for j in items(node, "rayjobs", NS)]
    assert sorted(set(rayjobs)) == sorted(rayjobs) and f"{JOB}-r3" not in rayjobs, rayjobs
    assert steady.count() > 20
    assert steady.failures() == [], steady.failures()[:5]
    journey.reached.add("retrained")


def test_a_cluster_change_is_followed_through_the_pending_cluster(stack: Stack, journey: Journey) -> None:
    journey.require("retrained")
    node = stack.node
    clock = FIGURES["cluster change → new cluster serving"] = Milestones()
    url = _predict_url(stack)
    before = {
        c["metadata"]["name"] for c in items(node, "rayclusters", NS, f"kubetune.io/modeldeployment={DEPLOYMENT}")
    }
    with ClientLoop(url, {"inputs": [DELIVERY]}, journey.token, pause=0.2) as steady:
        patch = {"spec": {"resources": {"memory": "2304Mi"}}}
        node.kubectl("patch", "modeldeployment", DEPLOYMENT, "-n", NS, "--type=merge", "-p", json.dumps(patch))

        def following() -> bool:
            service = get(node, "rayservice", DEPLOYMENT, NS) or {}
            pending = ((service.get("status") or {}).get("pendingServiceStatus") or {}).get("rayClusterName")
            if pending:
                clock.mark("pending cluster named")
                # Once the operator has reconciled this generation, it must not call the rollout done
                # while KubeRay still brings the new cluster up (it may not have written status yet).
                deployment = _deployment(stack)
                progressing = condition(deployment, "Progressing")
                if progressing.get("observedGeneration") == deployment["metadata"]["generation"]:
                    assert progressing.get("status") == "True", f"not followed: {progressing}"
            now = {
                c["metadata"]["name"]
                for c in items(node, "rayclusters", NS, f"kubetune.io/modeldeployment={DEPLOYMENT}")
            }
            done = condition(_deployment(stack), "Progressing").get("status") == "False"
            return bool(pending is None and now and not now & before and done)

        wait_for(following, timeout=600, what="the new cluster to take over", diagnose=lambda: describe(node, NS))
        clock.mark("new cluster serving")
        time.sleep(3)
    assert condition(_deployment(stack), "Ready").get("status") == "True"
    assert steady.failures() == [], steady.failures()[:5]
    journey.reached.add("cluster-changed")


def test_an_artifact_that_fails_to_load_is_rolled_back(stack: Stack, journey: Journey) -> None:
    journey.require("retrained")
    node = stack.node
    s3 = stack.s3()
    serving = (_deployment(stack).get("status") or {})["serving"]
    broken = f"runs/broken-{uuid.uuid4().hex[:6]}"
    # A copy of the served variant whose weights are not loadable.
    prefix = serving["uri"].removeprefix(f"s3://{BUCKET}/").rstrip("/") + "/"
    for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
        name = item["Key"][len(prefix) :]
        body = (
            b"not a model"
            if name.endswith(".safetensors")
            else s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        )
        s3.put_object(Bucket=BUCKET, Key=f"{broken}/{name}", Body=body)
    clock = FIGURES["rollback: broken artifact → back to the served one"] = Milestones()
    url = _predict_url(stack)
    with ClientLoop(url, {"inputs": [BILLING]}, journey.token, pause=0.2) as steady:
        patch = {"spec": {"model": {"fromFineTuneJob": None, "uri": f"s3://{BUCKET}/{broken}"}}}
        node.kubectl("patch", "modeldeployment", DEPLOYMENT, "-n", NS, "--type=merge", "-p", json.dumps(patch))

        def rolled_back() -> bool:
            status = _deployment(stack).get("status") or {}
            back = (status.get("serving") or {}).get("uri") == serving["uri"] and not status.get("rolloutStartTime")
            return bool((status.get("rejected") or {}).get("uri", "").endswith(broken) and back)

        wait_for(rolled_back, timeout=900, what="the rollback", diagnose=lambda: describe(node, NS))
        clock.mark("rolled back")
        time.sleep(3)
    body = _deployment(stack)
    assert condition(body, "Degraded").get("status") == "True"
    assert steady.failures() == [], steady.failures()[:5]
    journey.reached.add("rolled-back")


def test_deleting_them_removes_every_pod(stack: Stack, journey: Journey) -> None:
    journey.require("trained")
    node = stack.node
    clock = FIGURES["delete → no pods"] = Milestones()
    node.kubectl("delete", "modeldeployment,finetunejob", "--all", "-n", NS, "--wait=false")
    wait_for(
        lambda: not items(node, "pods", NS), timeout=300, what="every pod to go", diagnose=lambda: describe(node, NS)
    )
    clock.mark("no pods")
