"""kubetune on the real node, as a platform team would install it: the node tier's cluster and `scripts/cluster`.

On top of :class:`~tests.controlplane.realnode.RealNode` (a one-node Kubernetes with
KubeRay): kubetune's images assembled from local root filesystems and imported into the
node, an S3-compatible server that pods reach (moto, on the node's address), the operator
installed with Helm from `charts/kubetune` into a namespace that enforces the restricted
Pod Security level, and a team namespace (restricted too) with a storage Secret and the
text-classification example's data in a bucket.

    python tests/node/stack.py up     # start it all and leave it running; prints how to use it
    python tests/node/stack.py down   # stop it and undo every change to the machine
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):  # run as a script: import the tests package beside it
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.node"

from ..controlplane import nodehost
from ..controlplane.images import BuiltImage, build_images
from ..controlplane.realnode import KEPT, RealNode

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "kubetune"
RELEASE = "kubetune"
OPERATOR_NAMESPACE = "kubetune-system"
TEAM_NAMESPACE = "team-a"
STORAGE_SECRET = "training-storage"
BUCKET = "kubetune-examples"
EXAMPLE = REPO_ROOT / "examples" / "text-classification" / "finetunejob.yaml"
EXAMPLE_DATA = EXAMPLE.with_name("tickets.jsonl")
TRAIN_KEY = "support-tickets/train.jsonl"
# The S3 server's (moto's) credentials: any keys work; the pods get them from the Secret.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetune", "AWS_SECRET_ACCESS_KEY": "kubetune-secret"}
S3_REGION = "us-east-1"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
# The images the stack runs: the operator's, and the runtime's with the example's model baked in
# (the node reaches no model hub; the pause image comes with the node).
IMAGES = ("operator", "runtime-minilm")


@dataclass
class Stack:
    node: RealNode
    images: Mapping[str, BuiltImage]
    s3_endpoint: str

    @property
    def runtime_image(self) -> str:
        return self.images["runtime-minilm"].name

    def s3(self) -> Any:
        """A boto3 S3 client of the stack's server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name=S3_REGION,
            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def storage(self) -> dict[str, Any]:
        """`spec.storage` of the team's FineTuneJobs and ModelDeployments."""
        return {
            "credentialsSecret": {"name": STORAGE_SECRET},
            "s3Endpoint": self.s3_endpoint,
            "s3Region": S3_REGION,
            # The node reaches no model hub: models come from the image's own cache.
            "huggingFace": {"offline": True},
        }

    def apply(self, *documents: Mapping[str, Any], namespace: str) -> None:
        self.node.kubectl(
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
            input=json.dumps({"kind": "List", "apiVersion": "v1", "items": list(documents)}),
        )


# The example's resources, sized so that the requests of a training run (head 250m, 2 workers of 350m, the
# submitter's 100m) and of an endpoint with one replica (head 250m, autoscaler 100m, replica 400m) fit together
# on a 2-CPU node beside the operator (50m). The limits let each pod use what the others leave idle: Ray's
# control processes need a whole CPU for a while as they start, and time out when held to a quarter of one.
JOB_RESOURCES = {
    "workers": 2,
    "cpuPerWorker": "350m",
    "cpuLimitPerWorker": "1",
    "memoryPerWorker": "3Gi",
    "ephemeralStoragePerWorker": "2Gi",
    "head": {"cpu": "250m", "cpuLimit": "1", "memory": "3Gi", "ephemeralStorage": "2Gi"},
}
REPLICA_RESOURCES = {
    "cpu": "400m",
    "cpuLimit": "1",
    "memory": "2Gi",
    "ephemeralStorage": "2Gi",
    "head": {"cpu": "250m", "cpuLimit": "1", "memory": "2Gi", "ephemeralStorage": "2Gi"},
    "autoscaler": {"cpu": "100m", "cpuLimit": "500m", "memory": "512Mi"},
}
ENDPOINT_TOKEN_SECRET = "endpoint-token"


def example_manifests(stack: Stack, token: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The text-classification example (FineTuneJob, ModelDeployment) for this cluster, and the token's Secret.

    Only what a cluster needs changes: the data and outputs move to the bucket, the storage and the
    model hub are the cluster's, the resources fit the node, and the endpoint wants a token.
    """
    job, deployment = (d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d)
    job["spec"]["data"]["train"] = f"s3://{BUCKET}/{TRAIN_KEY}"
    job["spec"]["output"]["uri"] = f"s3://{BUCKET}/runs/{job['metadata']['name']}"
    job["spec"]["storage"] = stack.storage()
    job["spec"]["resources"] = JOB_RESOURCES
    spec = deployment["spec"]
    spec["storage"] = stack.storage()
    spec["resources"] = REPLICA_RESOURCES
    # Two replicas at most (what the node holds), and back to one soon after the load.
    spec["autoscaling"] = {**spec["autoscaling"], "maxReplicas": 2, "downscaleDelaySeconds": 15}
    # A rollout that has not succeeded after 7 minutes here never will.
    spec["rolloutDeadlineSeconds"] = 420
    spec["auth"] = {"tokenSecret": {"name": ENDPOINT_TOKEN_SECRET, "key": "token"}}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": ENDPOINT_TOKEN_SECRET},
        "stringData": {"token": token},
    }
    return job, deployment, secret


def start_s3(node: RealNode) -> str:
    """moto's S3 server on the node's address, where pods and the tests reach it; stopped with the node."""
    port = node.network.port(nodehost.FREE_FOR_TESTS)
    server = Path(sys.executable).with_name("moto_server")
    node.spawn("s3", [server, "-H", node.network.node_ip, "-p", str(port)])
    endpoint = f"http://{node.network.node_ip}:{port}"
    deadline = time.monotonic() + 60
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        try:
            with opener.open(endpoint, timeout=2):
                return endpoint
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the S3 server did not start\n{node.logs()}") from None
            time.sleep(0.2)


def install_operator(stack: Stack, extra_values: Sequence[str] = ()) -> None:
    """`helm upgrade --install` of the chart with the local operator image, as a platform team would."""
    node, operator = stack.node, stack.images["operator"]
    repository, tag = operator.name.rsplit(":", 1)
    if node.kubectl("get", "namespace", OPERATOR_NAMESPACE, check=False).returncode != 0:
        node.kubectl("create", "namespace", OPERATOR_NAMESPACE)
    node.kubectl("label", "--overwrite", "namespace", OPERATOR_NAMESPACE, *(f"{k}={v}" for k, v in RESTRICTED.items()))
    node.helm(
        "upgrade", "--install", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE, "--wait", "--timeout", "180s",
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", f"operator.runtimeImage={stack.runtime_image}",
        # One small node: a little CPU for the operator, and finished training clusters go at once.
        "--set", "resources.requests.cpu=50m",
        "--set", "operator.finishedClusterTtlSeconds=10",
        *extra_values,
        timeout=300,
    )  # fmt: skip


def upload_example_data(stack: Stack) -> None:
    """The example's tickets in the bucket, where its FineTuneJob reads them."""
    s3 = stack.s3()
    if BUCKET not in {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(EXAMPLE_DATA), BUCKET, TRAIN_KEY)


def prepare_namespace(stack: Stack, namespace: str) -> None:
    """A team's namespace (restricted Pod Security) with the storage Secret its specs name."""
    node = stack.node
    node.kubectl("create", "namespace", namespace)
    node.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in RESTRICTED.items()))
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": STORAGE_SECRET},
        "stringData": {**S3_CREDENTIALS, "AWS_DEFAULT_REGION": S3_REGION},
    }
    stack.apply(secret, namespace=namespace)


def start_stack(*, keep: bool = False, images: Sequence[str] = IMAGES) -> Stack:
    """Build the images (cached), start the node with them, the S3 server, the operator and the team namespace."""
    built = build_images(list(images))
    node = RealNode()
    node.start({image.name: image.archive for image in built.values()}, keep=keep)
    node.prune_images(image.name for image in built.values())
    try:
        stack = Stack(node, built, start_s3(node))
        install_operator(stack)
        upload_example_data(stack)
    except BaseException:
        if not keep:
            node.stop()
        raise
    return stack


def attach_stack(images: Sequence[str] = IMAGES) -> Stack | None:
    """The stack `scripts/cluster up` left running, if there is one, brought up to this checkout's images."""
    node = RealNode()
    if node.running_owner() != KEPT:
        return None
    node.bin = {path.name: path.resolve() for path in (node.run / "bin").iterdir()}
    endpoint = f"http://{node.network.node_ip}:{node.network.port(nodehost.FREE_FOR_TESTS)}"
    built = build_images(list(images))
    node.import_images({image.name: image.archive for image in built.values()})
    node.prune_images(image.name for image in built.values())
    stack = Stack(node, built, endpoint)
    # Helm installs the chart's CRDs but never upgrades them: an upgrade applies them first.
    node.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    install_operator(stack)
    return stack


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kubetune on a one-node Kubernetes with real pods, on this machine.")
    parser.add_argument("command", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    node = RealNode()
    if args.command == "status":
        owner = node.running_owner()
        print(f"running ({'scripts/cluster' if owner == 'kept' else f'process {owner}'})" if owner else "not running")
        return 0
    if args.command == "down":
        node.stop()
        left = node.leftovers()
        print("stopped; nothing left behind" if not left else f"stopped, but left behind: {', '.join(left)}")
        return 1 if left else 0
    began = time.monotonic()
    stack = start_stack(keep=True)
    prepare_namespace(stack, TEAM_NAMESPACE)
    token = secrets.token_hex(16)
    example = REPO_ROOT / "kubetune-output" / "cluster" / "text-classification.yaml"
    example.parent.mkdir(parents=True, exist_ok=True)
    example.write_text(yaml.safe_dump_all(example_manifests(stack, token), sort_keys=False))
    kubectl = f"{node.run / 'bin' / 'kubectl'} --kubeconfig {node.kubeconfig}"
    print(f"kubetune runs on a one-node Kubernetes ({time.monotonic() - began:.0f} s): the operator in")
    print(f"{OPERATOR_NAMESPACE}, KubeRay, and S3 at {stack.s3_endpoint} (bucket {BUCKET}, keys in the Secret")
    print(f"{TEAM_NAMESPACE}/{STORAGE_SECRET}). The text-classification example, made for it:")
    print(f"  alias kubectl='{kubectl}'")
    print(f"  kubectl apply -n {TEAM_NAMESPACE} -f {example.relative_to(REPO_ROOT)}")
    print(f"  kubectl get ftj,mdep -n {TEAM_NAMESPACE} -w")
    print(f"  kubectl port-forward -n {TEAM_NAMESPACE} svc/support-tickets-serve-svc 8000  # then, with the token:")
    print(f"  curl -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\")
    print('       -d \'{"inputs": ["My parcel never arrived"]}\' http://127.0.0.1:8000/v1/predict')
    print("  scripts/cluster down   # stop it all, and undo every change to this machine")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
