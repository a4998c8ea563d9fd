"""kubetune's images, assembled from local root filesystems, checked against their Dockerfiles and run.

The node tier runs these images on a real one-node Kubernetes; here they are built (or found in the
cache: a cold build takes 7 to 16 minutes on 2 cores, most of it the runtime's ~7 GB of Python
packages), their configs compared with what images/*/Dockerfile declare, their Python, Ray and
torch with pyproject's pins, and the runtime image run in a restricted pod on the node (the
operator's runs in the journey, from the chart). Needs root; skipped otherwise, or where the
images cannot be assembled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from ..conftest import REPO_ROOT
from ..controlplane.images import (
    BuildStepError,
    BuiltImage,
    ImagesUnavailableError,
    build_images,
    cache_root,
    dockerfile,
    layers,
)
from ..controlplane.images import config as image_configs
from ..controlplane.images.oci import layer_members, read_archive
from ..controlplane.images.sources import LOCK_FOLDER, locked
from .journey import run_client_pod
from .stack import Stack, prepare_namespace

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="assembling and running images needs root"),
    # A cold build of the runtime image (debootstrap, ~7 GB of packages, two archives) takes ~30 minutes.
    pytest.mark.timeout(5400),
]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
WRITABLE_LABEL = "io.kubetune.writable-paths"


def _pin(name: str) -> str:
    requirements = [*PYPROJECT["dependencies"], *PYPROJECT["optional-dependencies"]["runtime"]]
    (pin,) = [str(r).split("==")[1] for r in requirements if re.split(r"[\[=]", r)[0] == name]
    return pin


# What the node runs: the runtime image with the example's model added (its last layer and one ENV).
NODE_IMAGES = ("pause", "operator", "runtime-minilm")
MODEL_CACHE = {"HF_HUB_CACHE": "/opt/huggingface/hub"}


@pytest.fixture(scope="module")
def images() -> dict[str, BuiltImage]:
    try:
        return build_images(NODE_IMAGES)
    except ImagesUnavailableError as error:
        pytest.skip(f"cannot assemble images here: {error}")


def _env(image: BuiltImage) -> dict[str, str]:
    """The image's environment; for the runtime-minilm image, the runtime image's (without the model's)."""
    env = dict(item.split("=", 1) for item in image.config["config"]["Env"])
    return {k: v for k, v in env.items() if k not in MODEL_CACHE} if image is _minilm(image) else env


def _minilm(image: BuiltImage) -> BuiltImage | None:
    return image if image.name.startswith("localhost/kubetune-runtime-minilm:") else None


@pytest.mark.parametrize(
    ("name", "dockerfile"),
    [("operator", image_configs.OPERATOR_DOCKERFILE), ("runtime-minilm", image_configs.RUNTIME_DOCKERFILE)],
)
def test_image_configs_are_what_the_dockerfiles_declare(
    images: dict[str, BuiltImage], name: str, dockerfile: Path
) -> None:
    image = images[name]
    archived = read_archive(image.archive)
    # The archive holds what build_images reports, under the reported name.
    assert (archived.name, archived.config) == (image.name, image.config)
    assert not image.name.endswith(":latest")
    assert image.manifest_digest.removeprefix("sha256:")[:12] in image.name.rpartition(":")[2]
    stage = image_configs.final_stage(dockerfile)
    base = image_configs.base_image(stage.base)
    declared = image.config["config"]
    env = _env(image)
    for key, value in stage.env.items():
        assert env[key] == value, key
    assert {k: v for k, v in env.items() if k not in stage.env} == {
        k: v for k, v in base.env.items() if k not in stage.env
    }
    assert declared["User"] == stage.user
    assert declared.get("Labels") == stage.labels and WRITABLE_LABEL in stage.labels
    assert sorted(declared.get("ExposedPorts", {})) == stage.exposed_ports
    assert declared.get("Entrypoint") == stage.entrypoint
    # Docker clears the base image's CMD when a Dockerfile sets ENTRYPOINT without CMD.
    cmd = stage.cmd if stage.cmd or stage.entrypoint else base.cmd
    assert declared.get("Cmd") == (list(cmd) if cmd else None)
    assert declared["WorkingDir"] == (stage.workdir or base.workdir)
    assert image.config["architecture"] == image_configs.architecture() and image.config["os"] == "linux"


def test_the_runtime_image_carries_the_ray_images_environment(images: dict[str, BuiltImage]) -> None:
    minilm = images["runtime-minilm"]
    env = _env(minilm)
    assert env["PATH"].split(":")[0] == "/home/ray/anaconda3/bin"
    assert (env["HOME"], env["LANG"], env["LC_ALL"]) == ("/tmp", "C.UTF-8", "C.UTF-8")
    stage = image_configs.final_stage(image_configs.RUNTIME_DOCKERFILE)
    labels = minilm.config["config"]["Labels"]
    assert (
        f"Ray {stage.args['RAY_VERSION']} ({stage.args['FLAVOUR']})" in labels["org.opencontainers.image.description"]
    )
    # The MiniLM image is the runtime image plus its model and where the hub cache is; nothing else.
    full_env = dict(item.split("=", 1) for item in minilm.config["config"]["Env"])
    assert full_env == {**env, **MODEL_CACHE}
    model_layer = minilm.layers[-1]
    added = {member.name for digest, member, _ in layer_members(minilm.archive) if digest == model_layer}
    assert added and all(name.startswith("opt") for name in added), sorted(added)[:5]


def _distributions(image: BuiltImage) -> dict[str, str]:
    """Name to version of every distribution installed in the image (from its dist-info folders)."""
    found: dict[str, str] = {}
    for _, member, _ in layer_members(image.archive):
        match = re.search(r"site-packages/([^/]+)-([^-/]+)\.dist-info/METADATA$", member.name)
        if match:
            found[match[1].lower().replace("_", "-")] = match[2]
    return found


def _file(image: BuiltImage, path: str) -> str:
    """The text of the file at `path` in the image (its topmost layer's copy)."""
    found = None
    for _, member, tar in layer_members(image.archive):
        if member.name == path:
            content = tar.extractfile(member)
            assert content is not None, path
            found = content.read().decode()
    assert found is not None, f"{image.name} has no {path}"
    return found


def test_installed_versions_are_the_pinned_ones(images: dict[str, BuiltImage]) -> None:
    runtime = _distributions(images["runtime-minilm"])
    for name in ("ray", "torch", "transformers", "torchao", "peft", "pydantic", "kopf"):
        assert runtime[name] == _pin(name), name
    assert runtime["kubetune"] == PYPROJECT["version"]
    operator = _distributions(images["operator"])
    assert operator["kubetune"] == PYPROJECT["version"] and operator["kopf"] == _pin("kopf")
    assert not {"torch", "ray", "transformers"} & set(operator)
    # Each image carries exactly its lock file's versions (the Dockerfile installs it with hashes),
    # and besides the lock only kubetune and what a new Python environment brings (pip, setuptools).
    for installed, lock in (
        (runtime, f"runtime-{image_configs.RUNTIME_FLAVOUR}.txt"),
        (operator, "operator.txt"),
    ):
        pinned = {name: Version(entry.version) for name, entry in locked(REPO_ROOT / LOCK_FOLDER / lock).items()}
        found: dict[str, Version] = {canonicalize_name(n): Version(version) for n, version in installed.items()}
        assert {name: found.get(name) for name in pinned} == pinned, lock
        assert set(found) - set(pinned) <= {"kubetune", "pip", "setuptools", "wheel"}, lock
    # Both Python environments are Python 3.11, as pyproject requires.
    for name, config_file in (
        ("runtime-minilm", "home/ray/anaconda3/pyvenv.cfg"),
        ("operator", "usr/local/pyvenv.cfg"),
    ):
        assert re.search(r"^version = 3\.11\.\d+$", _file(images[name], config_file), re.M), name


def _leftovers(marker: str) -> list[str]:
    """Processes and mounts that still name `marker`."""
    found = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if marker in line]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(f"process {entry.name}")
            except OSError:
                continue
    return found


RUNTIME_CHECK = """
import os
os.environ['HF_HUB_OFFLINE'] = '1'  # read when huggingface_hub is imported
import subprocess, ray, torch, kubetune.runtime.recipe.pipeline
from transformers import AutoConfig
def check(*values):
    print('check:', *values, flush=True)
check(os.getuid(), os.getgid(), ray.__version__, torch.__version__.split('+')[0])
check(subprocess.run(['bash', '-lc', 'command -v ray'], capture_output=True, text=True).stdout.strip())
check('wget', subprocess.run(['wget', '--version'], capture_output=True).returncode)
try:
    open('/home/ray/anaconda3/x', 'w')
except OSError as error:
    check(error.strerror)
config = AutoConfig.from_pretrained('sentence-transformers/all-MiniLM-L6-v2')
check(config.model_type, os.access(os.environ['HF_HUB_CACHE'], os.W_OK))
"""


def test_the_runtime_image_runs_in_a_restricted_pod(stack: Stack) -> None:
    """As Ray's pods run it on the node: as ray (1000:100), on a read-only root, with KubeRay's tools (a login
    shell's `ray`, wget) and the pinned Ray and torch; the model loads from the image's read-only hub cache."""
    namespace = f"images-{uuid.uuid4().hex[:6]}"
    prepare_namespace(stack, namespace)
    try:
        logs = run_client_pod(stack, namespace, RUNTIME_CHECK, timeout=300, memory="2Gi")
    finally:
        stack.node.kubectl("delete", "namespace", namespace, "--wait=false")
    # The pod's log mixes in what libraries print on stderr; the checks are the marked lines.
    output = [line.removeprefix("check: ") for line in logs.splitlines() if line.startswith("check: ")]
    assert output[0].split() == ["1000", "100", _pin("ray"), _pin("torch")]
    assert output[1:] == ["/home/ray/anaconda3/bin/ray", "wget 0", "Read-only file system", "bert False"]


def _handles(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` (its SigCgt mask)."""
    caught = re.search(r"^SigCgt:\s+([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
    return caught is not None and bool(int(caught[1], 16) & (1 << (sig - 1)))


def test_the_pause_program_exits_on_sigterm_as_pid_1() -> None:
    """The pod sandbox's process, as PID 1 of a PID namespace (where only handled signals arrive)."""
    (pause,) = build_images(["pause"]).values()
    binary = Path(tempfile.mkdtemp()) / "pause"
    for _, member, tar in layer_members(pause.archive):
        if member.name == "pause" and (content := tar.extractfile(member)) is not None:
            binary.write_bytes(content.read())
    binary.chmod(0o755)
    holder = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", str(binary)])
    try:
        children = Path(f"/proc/{holder.pid}/task/{holder.pid}/children")
        for _ in range(100):  # the forked pause, once its SIGTERM handler is installed
            child = children.read_text().split()
            if child and _handles(int(child[0]), signal.SIGTERM):
                break
            time.sleep(0.05)
        else:
            pytest.fail("pause did not start")
        os.kill(int(child[0]), signal.SIGTERM)
        assert holder.wait(10) == 0
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(binary.parent)


def test_the_command_line_prints_references_and_archives(images: dict[str, BuiltImage]) -> None:
    # As a shell script calls it: the file run directly, from another folder; all cached by now.
    command = [sys.executable, str(REPO_ROOT / "tests" / "controlplane" / "images"), "build", "pause", "operator"]
    result = subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=600, check=True)
    printed = json.loads(result.stdout)
    assert printed == {
        name: {"reference": images[name].name, "archive": str(images[name].archive)} for name in ("pause", "operator")
    }


def test_a_failing_build_check_fails_the_build_and_leaves_nothing_behind(
    images: dict[str, BuiltImage], tmp_path: Path
) -> None:
    # A Dockerfile whose build check fails, on the operator's Debian layer (built by now).
    (debian,) = (cache_root() / "layers").glob("debian-*/diff")
    stage = dockerfile.parse("FROM python:3.11-slim\nRUN touch /made\nRUN sleep 600 & test -e /made && exit 7\n")[-1]
    runs = layers.DockerfileRuns(stage.runs, {"PATH": layers.BASE_PATH}, "", "/", ("/bin/sh", "-c"), tmp_path)
    layer = layers.dockerfile_steps("failing", None, runs, "/usr/bin/python3", ["test"])
    step = layers.Step(tmp_path / "upper", [debian], tmp_path / "scratch", tmp_path / "build.log", tmp_path)
    step.upper.mkdir()
    step.scratch.mkdir()
    with pytest.raises(BuildStepError, match="exited 7"):
        layer.build(step)
    # The first RUN's change is in the layer; the check's background process ended with its namespace.
    assert (step.upper / "made").is_file()
    assert not _leftovers(str(tmp_path))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["build.log", "scratch", "upper"]
