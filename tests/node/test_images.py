"""kubetune's images, assembled from local root filesystems, checked against their Dockerfiles and run.

The node tier runs these images on a real one-node Kubernetes; here they are built (or found in the
cache: a cold build takes about half an hour on 2 cores, most of it the runtime's ~7 GB of Python
packages), their configs compared with what images/*/Dockerfile declare, their Python, Ray and
torch with pyproject's pins, and then imported into a throwaway containerd and run as pods run
them: as the image's user, on a read-only root with tmpfs at the image's writable paths.
Needs root; skipped otherwise, or where the images cannot be assembled.
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
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import REPO_ROOT
from ..controlplane.debian import MissingPackagesError
from ..controlplane.images import (
    IMAGE_NAMES,
    BuildStepError,
    BuiltImage,
    ImagesUnavailableError,
    build_images,
    cache_root,
    dockerfile,
    layers,
)
from ..controlplane.images import config as image_configs
from ..controlplane.images.containerd import Containerd
from ..controlplane.images.oci import layer_members, read_archive

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


@pytest.fixture(scope="module")
def images() -> dict[str, BuiltImage]:
    try:
        return build_images(IMAGE_NAMES)
    except ImagesUnavailableError as error:
        pytest.skip(f"cannot assemble images here: {error}")


def _env(image: BuiltImage) -> dict[str, str]:
    return dict(item.split("=", 1) for item in image.config["config"]["Env"])


@pytest.mark.parametrize(
    ("name", "dockerfile"),
    [("operator", image_configs.OPERATOR_DOCKERFILE), ("runtime", image_configs.RUNTIME_DOCKERFILE)],
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
    env = _env(images["runtime"])
    assert env["PATH"].split(":")[0] == "/home/ray/anaconda3/bin"
    assert (env["HOME"], env["LANG"], env["LC_ALL"]) == ("/tmp", "C.UTF-8", "C.UTF-8")
    stage = image_configs.final_stage(image_configs.RUNTIME_DOCKERFILE)
    labels = images["runtime"].config["config"]["Labels"]
    assert (
        f"Ray {stage.args['RAY_VERSION']} ({stage.args['FLAVOUR']})" in labels["org.opencontainers.image.description"]
    )
    # The MiniLM image is the runtime image plus its model and where the hub cache is; nothing else.
    minilm = images["runtime-minilm"]
    assert _env(minilm) == {**env, "HF_HUB_CACHE": "/opt/huggingface/hub"}
    assert {k: v for k, v in minilm.config["config"].items() if k != "Env"} == {
        k: v for k, v in images["runtime"].config["config"].items() if k != "Env"
    }
    assert minilm.layers[:-1] == images["runtime"].layers
    assert minilm.name.startswith("localhost/kubetune-runtime-minilm:")


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
    runtime = _distributions(images["runtime"])
    for name in ("ray", "torch", "transformers", "torchao", "peft", "pydantic", "kopf"):
        assert runtime[name] == _pin(name), name
    assert runtime["kubetune"] == PYPROJECT["version"]
    operator = _distributions(images["operator"])
    assert operator["kubetune"] == PYPROJECT["version"] and operator["kopf"] == _pin("kopf")
    assert not {"torch", "ray", "transformers"} & set(operator)
    # Both Python environments are Python 3.11, as pyproject requires.
    for name, config_file in (("runtime", "home/ray/anaconda3/pyvenv.cfg"), ("operator", "usr/local/pyvenv.cfg")):
        assert re.search(r"^version = 3\.11\.\d+$", _file(images[name], config_file), re.M), name


def _leftovers(marker: str) -> list[str]:
    """Processes, mounts and cgroups that still name `marker`."""
    found = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if marker in line]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(f"process {entry.name}")
            except OSError:
                continue
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        found += [str(path) for path in hierarchy.glob("kubetune-check-*")]
    return found


def _space_needed(images: dict[str, BuiltImage]) -> int:
    """Bytes an import of all `images` takes: each distinct layer once as content, once unpacked."""
    layer_sizes: dict[str, int] = {
        layer["digest"]: layer["size"]
        for image in images.values()
        for layer in read_archive(image.archive).manifest["layers"]
    }
    return 2 * sum(layer_sizes.values())


@pytest.fixture(scope="module")
def containerd(images: dict[str, BuiltImage]) -> Iterator[Containerd]:
    needed, free = _space_needed(images), shutil.disk_usage(tempfile.gettempdir()).free
    if free < needed + 5e9:  # and some room left for everything else on the machine
        pytest.skip(f"importing the images takes {needed / 1e9:.0f} GB; {free / 1e9:.0f} GB are free")
    run_directory_existed = Path("/run/containerd").exists()
    try:
        daemon = Containerd()
        daemon.start()
    except MissingPackagesError as error:
        pytest.skip(str(error))
    folder = str(daemon.folder)
    try:
        for image in images.values():
            daemon.ctr("images", "import", str(image.archive), timeout=1800)
        yield daemon
    finally:
        daemon.stop()
        assert not Path(folder).exists()
        assert not _leftovers(folder)
        assert Path("/run/containerd").exists() == run_directory_existed


def test_ctr_imports_every_image_under_its_name(containerd: Containerd, images: dict[str, BuiltImage]) -> None:
    listed = containerd.ctr("images", "ls", "--quiet").stdout.split()
    assert {image.name for image in images.values()} <= set(listed)


def test_the_runtime_runs_as_ray_on_a_read_only_root(containerd: Containerd, images: dict[str, BuiltImage]) -> None:
    runtime = images["runtime"]
    writable = runtime.config["config"]["Labels"][WRITABLE_LABEL].split(",")
    script = (
        "import os, kubetune.runtime.pipeline, ray, torch; "
        "print(os.getuid(), os.getgid(), ray.__version__, torch.__version__.split('+')[0]); "
        "open('/tmp/ok', 'w').write('tmpfs'); open(os.path.expanduser('~/x'), 'w').write('home is /tmp')"
    )
    output = containerd.run(runtime.name, ["python", "-c", script], tmpfs=writable)
    assert output.split() == ["1000", "100", _pin("ray"), _pin("torch")]
    # KubeRay's containers start `bash -lc 'ray start ...'`: the login shell finds the same ray.
    assert (
        containerd.run(runtime.name, ["bash", "-lc", "command -v ray"], tmpfs=writable).strip()
        == "/home/ray/anaconda3/bin/ray"
    )
    assert "wget" in containerd.run(runtime.name, ["wget", "--version"], tmpfs=writable)
    refused = containerd.run(runtime.name, ["bash", "-c", "touch /home/ray/anaconda3/x 2>&1 || true"], tmpfs=writable)
    assert "Read-only file system" in refused


def test_the_minilm_image_loads_its_model_without_a_hub(containerd: Containerd, images: dict[str, BuiltImage]) -> None:
    minilm = images["runtime-minilm"]
    writable = minilm.config["config"]["Labels"][WRITABLE_LABEL].split(",")
    script = (
        "from transformers import AutoConfig; import os; "
        "c = AutoConfig.from_pretrained('sentence-transformers/all-MiniLM-L6-v2'); "
        "print(c.model_type, os.access(os.environ['HF_HUB_CACHE'], os.W_OK))"
    )
    output = containerd.run(minilm.name, ["env", "HF_HUB_OFFLINE=1", "python", "-c", script], tmpfs=writable)
    assert output.split()[-2:] == ["bert", "False"]


def test_the_operator_image_starts_the_operator(containerd: Containerd, images: dict[str, BuiltImage]) -> None:
    operator = images["operator"]
    writable = operator.config["config"]["Labels"][WRITABLE_LABEL].split(",")
    # As kubelet runs a container with `args`: after the image's entry point, `kubetune operator`.
    usage = containerd.run(operator.name, [*operator.config["config"]["Entrypoint"], "--help"], tmpfs=writable)
    assert "--namespace" in usage and "--metrics-port" in usage


def test_the_pause_image_exits_on_sigterm(containerd: Containerd, images: dict[str, BuiltImage]) -> None:
    name = f"kubetune-check-{uuid.uuid4().hex[:8]}"
    containerd.ctr("run", "--detach", "--read-only", "--cgroup", f"/{name}", images["pause"].name, name)
    try:
        tasks = containerd.ctr("tasks", "ls").stdout
        running = re.search(rf"^{name}\s+(\d+)\s+RUNNING", tasks, re.M)
        assert running, tasks
        # As PID 1 of its namespace it ignores SIGTERM until its handler is installed: wait for that.
        status = Path(f"/proc/{running[1]}/status")
        for _ in range(100):
            caught = int(re.search(r"^SigCgt:\s+([0-9a-f]+)$", status.read_text(), re.M)[1], 16)  # type: ignore[index]
            if caught & (1 << (signal.SIGTERM - 1)):
                break
            time.sleep(0.05)
        containerd.ctr("tasks", "kill", "--signal", "SIGTERM", name)
        for _ in range(100):
            if re.search(rf"^{name}\s+\d+\s+STOPPED", containerd.ctr("tasks", "ls").stdout, re.M):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the pause container did not stop on SIGTERM")
    finally:
        containerd.ctr("tasks", "delete", "--force", name, check=False)
        containerd.ctr("containers", "delete", name, check=False)


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
