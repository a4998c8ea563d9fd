"""OCI image layouts as tar archives that `ctr images import` reads, from layer directories.

A layer directory is an overlayfs upper directory: what one build step changed, with overlayfs'
deletion marks (a character device 0:0 for a removed file, the `trusted.overlay.opaque` attribute
on a directory that replaced a lower one). Its layer tar turns those into OCI whiteouts (`.wh.NAME`,
`.wh..wh..opq`) and is byte-reproducible: entries depth-first in byte order of their names, every
mtime `EPOCH`, numeric owners without names, no extended attributes, hard links kept. Layers stay
uncompressed (media type `...layer.v1.tar`), so a layer's digest is also its diff ID.

The archive holds `oci-layout`, `index.json` (one manifest, named with containerd's
`io.containerd.image.name` annotation and the OCI `ref.name` tag) and `blobs/sha256/*`. Layer blobs
are streamed from their directories straight into the archive; their digest is computed on the way
and the blob's tar header is written back once known.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

# 1980-01-01T00:00:00Z: every file's mtime in a layer (and on disk before Python compiles its
# byte code), and the images' creation time. The oldest time a zip file (a wheel) can hold.
EPOCH = 315532800
CREATED = "1980-01-01T00:00:00Z"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
IMAGE_NAME_ANNOTATION = "io.containerd.image.name"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
_OPAQUE_XATTR = "trusted.overlay.opaque"
_BLOCK = 512
_COPY_BUFFER = 1 << 20


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


class _HashingWriter:
    """A write-only file that hashes and counts what passes through (to `target`, if any)."""

    def __init__(self, target: BinaryIO | None = None) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        if self.target is not None:
            self.target.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def blob(self) -> Blob:
        return Blob(f"sha256:{self.sha256.hexdigest()}", self.size)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, _OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = EPOCH
    return info


def _walk(directory: str, prefix: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(name in the layer, path, lstat) below `directory`, depth-first, siblings in byte order."""
    with os.scandir(directory) as entries:
        children = sorted(entries, key=lambda entry: os.fsencode(entry.name))
    for entry in children:
        st = entry.stat(follow_symlinks=False)
        name = f"{prefix}{entry.name}"
        yield name, entry.path, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(entry.path, f"{name}/")


def write_layer(directory: Path, sink: BinaryIO | None) -> Blob:
    """Write the layer tar of `directory` to `sink` (or only hash it); returns its digest and size."""
    writer = _HashingWriter(sink)
    links: dict[tuple[int, int], str] = {}
    fileobj: IO[bytes] = writer  # type: ignore[assignment]
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        tar.copybufsize = _COPY_BUFFER  # type: ignore[attr-defined]  # (missing from typeshed)
        for name, path, st in _walk(str(directory), ""):
            if _is_whiteout(st):
                parent, _, base = name.rpartition("/")
                whiteout = _info(f"{parent}/.wh.{base}" if parent else f".wh.{base}", st)
                whiteout.type, whiteout.mode = tarfile.REGTYPE, 0o644
                tar.addfile(whiteout)
                continue
            info = _info(name, st)
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                if _is_opaque(path):
                    marker = _info(f"{name}/.wh..wh..opq", st)
                    marker.type, marker.mode = tarfile.REGTYPE, 0o644
                    tar.addfile(marker)
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                inode = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and inode in links:
                    info.type, info.linkname = tarfile.LNKTYPE, links[inode]
                    tar.addfile(info)
                    continue
                links[inode] = name
                info.size = st.st_size
                with open(path, "rb") as content:
                    tar.addfile(info, content)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                tar.addfile(info)
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            # Sockets are not part of an image.
    return writer.blob()


def canonical_json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _header(name: str, size: int, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uname, info.gname = size, EPOCH, "", ""
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    # GNU headers are one block for these short names, also for blobs over 8 GiB (base-256 sizes).
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "strict")


def _pad(out: BinaryIO, size: int) -> None:
    out.write(b"\0" * (-size % _BLOCK))


def _blob_name(digest: str) -> str:
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


def _add(out: BinaryIO, name: str, data: bytes) -> None:
    out.write(_header(name, len(data)))
    out.write(data)
    _pad(out, len(data))


def _add_layer(out: BinaryIO, directory: Path, expected: Blob | None) -> Blob:
    start = out.tell()
    out.write(_header(_blob_name("0" * 64), 0))
    blob = write_layer(directory, out)
    if expected is not None and blob != expected:
        raise RuntimeError(f"layer {directory} changed since it was built: {blob} instead of {expected}")
    _pad(out, blob.size)
    end = out.tell()
    out.seek(start)
    out.write(_header(_blob_name(blob.digest), blob.size))
    out.seek(end)
    return blob


@dataclass(frozen=True)
class Written:
    """An archive's image: its name, manifest digest, full config and layer blobs (oldest first)."""

    reference: str
    manifest_digest: str
    config: dict[str, Any]
    layers: list[Blob]


def write_archive(
    path: Path,
    reference: str,
    config: dict[str, Any],
    layers: Sequence[tuple[Path, Blob | None]],
) -> Written:
    """Write an OCI archive of the image: `config` (without `rootfs`) over `layers`, oldest first.

    Each layer is (directory, its blob if known, else None). The image is named `reference`,
    whose tag may contain `{digest}`: it is filled in with the first 12 hex digits of the
    manifest digest.
    """
    with open(path, "wb") as out:
        _add(out, "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
        out.write(_header("blobs/", 0, directory=True))
        out.write(_header("blobs/sha256/", 0, directory=True))
        blobs = [_add_layer(out, directory, expected) for directory, expected in layers]
        full_config = {**config, "rootfs": {"type": "layers", "diff_ids": [blob.digest for blob in blobs]}}
        config_bytes = canonical_json(full_config)
        config_digest = f"sha256:{hashlib.sha256(config_bytes).hexdigest()}"
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config_bytes)},
            "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": b.digest, "size": b.size} for b in blobs],
        }
        manifest_bytes = canonical_json(manifest)
        manifest_digest = f"sha256:{hashlib.sha256(manifest_bytes).hexdigest()}"
        final = reference.format(digest=manifest_digest.removeprefix("sha256:")[:12])
        _add(out, _blob_name(config_digest), config_bytes)
        _add(out, _blob_name(manifest_digest), manifest_bytes)
        platform = {"architecture": config["architecture"], "os": config["os"]}
        annotations = {IMAGE_NAME_ANNOTATION: final, REF_NAME_ANNOTATION: final.rpartition(":")[2]}
        index = {
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [
                {
                    "mediaType": MANIFEST_MEDIA_TYPE,
                    "digest": manifest_digest,
                    "size": len(manifest_bytes),
                    "platform": platform,
                    "annotations": annotations,
                }
            ],
        }
        _add(out, "index.json", canonical_json(index))
        out.write(b"\0" * (2 * _BLOCK))
    return Written(final, manifest_digest, full_config, blobs)


@dataclass(frozen=True)
class ArchiveContents:
    """What an OCI archive says about its one image."""

    name: str
    manifest: dict[str, Any]
    config: dict[str, Any]


def read_archive(path: Path) -> ArchiveContents:
    """The image name, manifest and config of an archive written by `write_archive`."""
    with tarfile.open(path, "r:") as archive:

        def load(name: str) -> Any:
            member = archive.extractfile(name)
            if member is None:
                raise FileNotFoundError(f"{path}: no {name}")
            return json.loads(member.read())

        (entry,) = load("index.json")["manifests"]
        manifest = load(_blob_name(entry["digest"]))
        config = load(_blob_name(manifest["config"]["digest"]))
        return ArchiveContents(entry["annotations"][IMAGE_NAME_ANNOTATION], manifest, config)


def layer_members(path: Path) -> Iterator[tuple[str, tarfile.TarInfo, tarfile.TarFile]]:
    """(layer digest, member, layer tar) for every entry of every layer of the archive's image, oldest first."""
    contents = read_archive(path)
    with tarfile.open(path, "r:") as archive:
        for layer in contents.manifest["layers"]:
            blob = archive.extractfile(_blob_name(layer["digest"]))
            if blob is None:
                raise FileNotFoundError(f"{path}: no blob {layer['digest']}")
            with tarfile.open(fileobj=blob, mode="r:") as tar:
                for member in tar:
                    yield layer["digest"], member, tar
