"""The image assembler's pure parts: reading Dockerfiles, composing configs, writing layers and archives."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from ..controlplane.images import build, config, layers, oci, rootfs
from ..controlplane.images.dockerfile import DockerfileError, Mount, parse

DOCKERFILE = """\
# syntax=docker/dockerfile:1
ARG VERSION=1.2
ARG FLAVOUR=cpu
FROM python:3.11-slim AS wheel
RUN echo wheel
FROM rayproject/ray:${VERSION}-py311-${FLAVOUR}
ARG VERSION
ARG FLAVOUR
ARG LOCAL=local-default
USER 1000:100
RUN --mount=type=bind,from=wheel,source=/dist,target=/tmp/dist \\
    set -eux; \\
    # a comment inside the continuation is dropped
    echo "$VERSION" \\

    && echo done
ENV HOME=/tmp \\
    QUOTED="a b" SINGLE='$HOME stays' SAME_INSTRUCTION=${HOME:-unset}
ENV EXPANDED=${HOME}/x DEFAULTED=${UNSET:-fallback} ALT=${HOME:+set} BASE=$PATH
ENV LEGACY value with spaces
LABEL one="Ray ${VERSION} (${FLAVOUR})" two=plain
EXPOSE 8080 9090/udp
WORKDIR /work
ENTRYPOINT ["kubetune", "operator"]
RUN check "$LOCAL"
"""


def _final(text: str = DOCKERFILE, **build_args: str) -> Any:
    return parse(text, build_args, lambda base: {"PATH": "/usr/bin"})[-1]


def test_stages_args_and_base_images() -> None:
    first, final = parse(DOCKERFILE)
    assert (first.base, first.name, final.base, final.name) == (
        "python:3.11-slim",
        "wheel",
        "rayproject/ray:1.2-py311-cpu",
        None,
    )
    assert final.args == {"VERSION": "1.2", "FLAVOUR": "cpu", "LOCAL": "local-default"}
    overridden = _final(FLAVOUR="gpu", LOCAL="mine")
    assert overridden.base == "rayproject/ray:1.2-py311-gpu"
    assert overridden.args["LOCAL"] == "mine"


def test_env_label_user_expose_workdir_entrypoint() -> None:
    final = _final()
    assert final.env == {
        "HOME": "/tmp",
        "QUOTED": "a b",
        "SINGLE": "$HOME stays",
        # As in Docker, an ENV instruction sees the variables of the ones before it, not its own.
        "SAME_INSTRUCTION": "unset",
        "EXPANDED": "/tmp/x",
        "DEFAULTED": "fallback",
        "ALT": "set",
        "BASE": "/usr/bin",
        "LEGACY": "value with spaces",
    }
    assert final.labels == {"one": "Ray 1.2 (cpu)", "two": "plain"}
    assert (final.user, final.workdir, final.exposed_ports) == ("1000:100", "/work", ["8080/tcp", "9090/udp"])
    assert (final.entrypoint, final.cmd) == (["kubetune", "operator"], None)


def test_runs_keep_their_text_user_environment_and_mounts() -> None:
    install, check = _final().runs
    # Continuation lines are joined as written; the comment and the empty line are dropped.
    assert install.command == 'set -eux;     echo "$VERSION"     && echo done'
    assert install.mounts == (Mount(type="bind", target="/tmp/dist", source="/dist", from_stage="wheel"),)
    assert (install.user, dict(install.env)) == ("1000:100", {})
    assert dict(install.args)["VERSION"] == "1.2"
    assert check.command == 'check "$LOCAL"'
    assert dict(check.env)["HOME"] == "/tmp" and check.workdir == "/work"


def test_a_stage_that_only_names_an_image_stands_for_it() -> None:
    text = (
        "ARG FLAVOUR=gpu\nFROM ray:1-gpu@sha256:" + "a" * 64 + " AS ray-gpu\nFROM ray:1-cpu AS ray-cpu\n"
        "FROM ray-${FLAVOUR}\nUSER 1000\n"
    )
    pinned = f"ray:1-gpu@sha256:{'a' * 64}"
    assert parse(text)[-1].base == pinned
    assert parse(text, {"FLAVOUR": "cpu"})[-1].base == "ray:1-cpu"
    # The final stage gets the ENV of the image the alias names.
    assert parse(text, None, lambda base: {"BASE": base})[-1].inherited == {"BASE": pinned}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ENV A=1\n", "before the first FROM"),
        ("FROM x AS built\nRUN make\nFROM built\n", "only a stage without instructions"),
        ("FROM x\nFROBNICATE\n", "unknown instruction"),
        ("FROM x\nRUN --network=none true\n", "not supported"),
        ("FROM x\nRUN --mount=type=cache,target=/c true\n", "only bind mounts"),
        ("FROM x\nENV A='open\n", "unterminated quote"),
        ("FROM x\nRUN a \\\n", "line continuation"),
        ("FROM x\nENV =1\n", "key=value"),
    ],
)
def test_what_the_parser_rejects(text: str, message: str) -> None:
    with pytest.raises(DockerfileError, match=message):
        parse(text)


def test_config_composition_follows_docker() -> None:
    base = config.BaseImage(env={"PATH": "/a", "HOME": "/root"}, user="1000", workdir="/home", cmd=("/bin/bash",))
    stage = _final('FROM x\nENV HOME=/tmp EXTRA=1\nLABEL k=v\nEXPOSE 80\nENTRYPOINT ["run"]\n')
    composed = config.image_config(base, stage, {"LAST": "yes"})["config"]
    # ENV replaces in place and appends; an ENTRYPOINT clears the inherited CMD.
    assert composed == {
        "Env": ["PATH=/a", "HOME=/tmp", "EXTRA=1", "LAST=yes"],
        "User": "1000",
        "WorkingDir": "/home",
        "Entrypoint": ["run"],
        "Labels": {"k": "v"},
        "ExposedPorts": {"80/tcp": {}},
    }
    assert config.image_config(base, _final("FROM x\nUSER 5\n"))["config"]["Cmd"] == ["/bin/bash"]


def _layer_entries(blob: bytes) -> list[tuple[str, str, int, int, float, int]]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return [(m.name, m.type.decode(), m.mode, m.uid, m.mtime, m.size) for m in tar]


def _sample_tree(root: Path) -> None:
    (root / "b").mkdir(parents=True)
    (root / "b" / "file").write_text("content")
    os.link(root / "b" / "file", root / "b" / "hardlink")
    (root / "a-link").symlink_to("b/file")
    (root / "c.py").write_text("print(1)\n")
    (root / "c.py").chmod(0o600)


def test_layers_are_byte_reproducible_and_sorted(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _sample_tree(first)
    _sample_tree(second)
    os.utime(second / "c.py", (0, 1_000_000_000))
    out_first, out_second = io.BytesIO(), io.BytesIO()
    blob = oci.write_layer(first, out_first)
    assert blob == oci.write_layer(second, out_second)
    assert out_first.getvalue() == out_second.getvalue()
    assert blob.digest == f"sha256:{hashlib.sha256(out_first.getvalue()).hexdigest()}" and blob.size == len(
        out_first.getvalue()
    )
    entries = _layer_entries(out_first.getvalue())
    assert [name for name, *_ in entries] == ["a-link", "b", "b/file", "b/hardlink", "c.py"]
    assert {(kind, mtime) for _, kind, _, _, mtime, _ in entries} >= {("2", oci.EPOCH), ("1", oci.EPOCH)}
    assert next(e for e in entries if e[0] == "c.py")[2] == 0o600
    with tarfile.open(fileobj=io.BytesIO(out_first.getvalue())) as tar:
        assert tar.getmember("b/hardlink").linkname == "b/file"
        assert all(m.uname == "" and m.gname == "" for m in tar)


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and trusted.* attributes need root")
def test_overlay_deletions_become_oci_whiteouts(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mknod(tmp_path / "dir" / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    (tmp_path / "replaced").mkdir()
    os.setxattr(tmp_path / "replaced", "trusted.overlay.opaque", b"y")
    (tmp_path / "replaced" / "new").write_text("x")
    out = io.BytesIO()
    oci.write_layer(tmp_path, out)
    names = [name for name, *_ in _layer_entries(out.getvalue())]
    assert names == ["dir", "dir/.wh.gone", "replaced", "replaced/.wh..wh..opq", "replaced/new"]


def test_archive_names_the_image_by_its_manifest(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    _sample_tree(layer)
    document = config.image_config(config.BaseImage(env={"PATH": "/bin"}))
    written = oci.write_archive(tmp_path / "image.tar", "localhost/x:1-{digest}", document, [(layer, None)])
    assert written.reference == f"localhost/x:1-{written.manifest_digest.removeprefix('sha256:')[:12]}"
    contents = oci.read_archive(tmp_path / "image.tar")
    assert contents.name == written.reference and contents.config == written.config
    assert contents.config["rootfs"]["diff_ids"] == [written.layers[0].digest]
    with tarfile.open(tmp_path / "image.tar") as archive:
        index = json.loads(archive.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = archive.extractfile(f"blobs/sha256/{written.manifest_digest[7:]}").read()  # type: ignore[union-attr]
        for member in archive.getmembers():
            if member.name.startswith("blobs/sha256/") and member.isfile():
                data = archive.extractfile(member).read()  # type: ignore[union-attr]
                assert hashlib.sha256(data).hexdigest() == member.name.rsplit("/", 1)[1]
    assert hashlib.sha256(manifest).hexdigest() == written.manifest_digest[7:]
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == written.reference.split(":")[1]
    # Writing it again gives the same bytes, and a known blob that does not match is refused.
    again = oci.write_archive(tmp_path / "again.tar", "localhost/x:1-{digest}", document, [(layer, written.layers[0])])
    assert again == written and (tmp_path / "again.tar").read_bytes() == (tmp_path / "image.tar").read_bytes()
    with pytest.raises(RuntimeError, match="changed since"):
        oci.write_archive(tmp_path / "bad.tar", "x:{digest}", document, [(layer, oci.Blob("sha256:" + "0" * 64, 1))])


def test_a_run_gets_the_args_then_the_base_env_then_its_own_env(tmp_path: Path) -> None:
    text = "FROM base\nARG HOME=/arg LEVEL=arg\nRUN first\nUSER 1000\nENV LEVEL=stage\nWORKDIR /w\nRUN second\n"
    first, second = parse(text)[-1].runs
    runs = layers.DockerfileRuns(
        [first, second], {"HOME": "/base", "PATH": "/bin"}, "", "/", ("/bin/bash", "-c"), tmp_path
    )
    # An ARG never wins over an ENV, the base image's included; RUNs run with the image's shell.
    assert runs.command(first) == layers.RunCommand(
        ["/bin/bash", "-c", "first"], {"HOME": "/base", "LEVEL": "arg", "PATH": "/bin"}, "0:0", "/", []
    )
    assert runs.command(second).environment["LEVEL"] == "stage"
    assert (runs.command(second).user, runs.command(second).cwd) == ("1000", "/w")
    mounted = parse("FROM base\nRUN --mount=type=bind,from=wheel,source=/dist,target=/tmp/dist true\n")[-1].runs[0]
    assert runs.command(mounted).binds == [rootfs.Bind(tmp_path, "/tmp/dist")]
    for unsupported in ("from=other,source=/dist", "from=wheel,source=/src"):
        other = parse(f"FROM base\nRUN --mount=type=bind,{unsupported},target=/x true\n")[-1].runs[0]
        with pytest.raises(ValueError, match="only the wheel stage"):
            runs.command(other)
    named = parse("FROM base\nUSER ray\nRUN x\n")[-1].runs[0]
    with pytest.raises(ValueError, match="numeric"):
        runs.command(named)


def test_the_cache_keeps_the_two_entries_of_an_image_used_last(tmp_path: Path) -> None:
    def entry(name: str, image: str, layer_dirs: list[str], used: float | None) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "image.json").write_text(json.dumps({"image": image, "layers": layer_dirs}))
        if used is not None:
            (tmp_path / name / "used").touch()
            os.utime(tmp_path / name / "used", (used, used))

    for layer in ("base-1", "top-1", "top-2", "top-3", "other-1", "old-1"):
        (tmp_path / "layers" / layer).mkdir(parents=True)
    entry("runtime-a", "runtime", ["base-1", "top-1"], used=None)  # built before `used` existed
    entry("runtime-b", "runtime", ["base-1", "top-2"], used=100)
    entry("runtime-c", "runtime", ["base-1", "top-3"], used=200)
    entry("operator-a", "operator", ["other-1"], used=50)
    removed: list[str] = []
    build._collect_garbage(tmp_path, ["runtime"], removed.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers", "operator-a", "runtime-b", "runtime-c"]
    # top-1 went with its entry; old-1 stays: no kept entry has a layer of that name, so nothing
    # replaced it (it may belong to an image whose build failed half-way).
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == ["base-1", "old-1", "other-1", "top-2", "top-3"]
    assert removed == ["removing the older runtime-a", "removing the unused layer top-1"]
