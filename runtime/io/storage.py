"""Reading and writing run URIs: file://, plain paths, pvc://<claim>/<path> and s3://<bucket>/<key>.

hf:// names a repository on the Hugging Face Hub (hf://<org>/<name> a model, hf://datasets/<org>/<name>
a dataset); those load through transformers and datasets (`kubetune.runtime.data.hub_datasets`), not as files
here.

S3 access uses boto3 with the endpoint and credentials of the environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), so
any S3-compatible store works. Remote objects are copied to the cache before use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kubetune.runtime.contract.common import URI_SCHEMES
from kubetune.runtime.contract.report import Unavailable

from .errors import StorageError, StorageUnavailableError
from .settings import RuntimeSettings

LOCAL_SCHEMES = frozenset({"file", "pvc", ""})
# Written last into a cache folder: its presence means the download finished; it names the local copy.
COMPLETE_MARKER = ".kubetune-download"


@dataclass(frozen=True)
class ParsedUri:
    """A URI split into its scheme ('' for a plain path) and the rest."""

    uri: str
    scheme: str
    location: str

    @property
    def bucket(self) -> str:
        return self.location.partition("/")[0]

    @property
    def key(self) -> str:
        return self.location.partition("/")[2]


def parse_uri(uri: str) -> ParsedUri:
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return ParsedUri(uri, "", uri)
    if scheme not in URI_SCHEMES:
        raise StorageError(uri, f"unsupported URI scheme {scheme!r}")
    return ParsedUri(uri, scheme, rest)


def hub_dataset_id(uri: str) -> str | None:
    """The repository id (<org>/<name>) of an hf://datasets/<org>/<name> URI; None for any other location."""
    parsed = parse_uri(uri)
    kind, _, repo_id = parsed.location.partition("/")
    if parsed.scheme != "hf" or kind != "datasets" or not repo_id:
        return None
    return repo_id


def local_path(uri: str, settings: RuntimeSettings) -> Path:
    """The filesystem path of a file://, pvc:// or plain-path URI; a pvc:// path never leaves its claim."""
    parsed = parse_uri(uri)
    if parsed.scheme == "pvc":
        claim, _, path = parsed.location.partition("/")
        if claim in {"", ".", ".."}:
            raise StorageError(uri, "pvc:// needs a claim name: pvc://<claim>/<path>")
        return inside(settings.pvc_root / claim, path, uri)
    if parsed.scheme in LOCAL_SCHEMES:
        return Path(parsed.location)
    raise StorageError(uri, f"{parsed.scheme}:// is not a local location")


def _lexical_parts(relative: str, uri: str) -> tuple[str, ...]:
    """The segments of `relative` with `.` and `..` resolved on paper; refused when absolute or climbing out."""
    if relative.startswith("/"):
        raise StorageError(uri, f"{relative!r} is an absolute path where a relative one belongs")
    parts: list[str] = []
    for segment in relative.split("/"):
        if segment in {"", "."}:
            continue
        if segment == "..":
            if not parts:
                raise StorageError(uri, f"{relative!r} leads outside its folder")
            parts.pop()
        else:
            parts.append(segment)
    return tuple(parts)


def _leaves(real_root: Path, path: Path) -> bool:
    return not path.resolve().is_relative_to(real_root)


def inside(root: Path, relative: str | PurePosixPath, uri: str) -> Path:
    """`root/relative`, refused (StorageError naming `uri`) where it would land outside `root`.

    `relative` is resolved lexically first; then no existing component of the result
    may be a symlink whose target lies outside `root`.
    """
    parts = _lexical_parts(str(relative), uri)
    real_root = root.resolve()
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink() and _leaves(real_root, path):
            raise StorageError(uri, f"{path} is a symlink that leads outside {root}")
    return path


def _escaping_link(folder: Path, real_root: Path) -> Path | None:
    """The first symlink anywhere under `folder` (not followed) whose target lies outside `real_root`."""
    for current, folders, files in os.walk(folder, followlinks=False):
        for name in (*folders, *files):
            entry = Path(current) / name
            if entry.is_symlink() and _leaves(real_root, entry):
                return entry
    return None


def output_path(root: Path, relative: str, uri: str) -> Path:
    """Where an output under `root` is written: `inside` it, and nothing already there links out of it.

    Writers follow symlinks (save_pretrained, Ray Train, open()), so an existing link to elsewhere
    would let a run overwrite files outside the output of `uri`.
    """
    path = inside(root, relative, uri)
    if path.is_dir():
        escaping = _escaping_link(path, root.resolve())
        if escaping is not None:
            raise StorageError(uri, f"{escaping} is a symlink that leads outside the output folder {root}")
    return path


def anchored(uri: str | None, base: Path) -> str | None:
    """A plain relative path made absolute against `base` (Ray workers run in other folders)."""
    if uri is None or "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment; AWS_ENDPOINT_URL_S3 wins over the generic one, as in the AWS SDKs."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client() -> Any:
    """A client that reads credentials from the environment now.

    boto3's default session resolves credentials once per process and keeps them; a fresh session does not.
    """
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=s3_endpoint())


def _s3_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []) if not item["Key"].endswith("/"))
    return keys


def cache_folder(uri: str, settings: RuntimeSettings, kind: str = "s3") -> Path:
    """A local folder of the cache that belongs to `uri` (downloads under "s3", staged outputs under "outputs")."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return settings.cache_dir / kind / digest


def download_s3(uri: str, settings: RuntimeSettings) -> Path:
    """Copy an s3:// object or every object under an s3:// prefix to the cache; return the local copy."""
    parsed = parse_uri(uri)
    target = cache_folder(uri, settings)
    marker = target / COMPLETE_MARKER
    if settings.reuse_downloads and marker.is_file():
        return target / marker.read_text(encoding="utf-8")
    # A fresh copy: objects deleted from the bucket since an earlier download must not linger.
    shutil.rmtree(target, ignore_errors=True)
    local = _download(parsed, target)
    marker.write_text(local.relative_to(target).as_posix(), encoding="utf-8")
    return local


def _download(parsed: ParsedUri, target: Path) -> Path:
    uri = parsed.uri
    client = s3_client()
    key = parsed.key.rstrip("/")
    try:
        keys = [key] if key and _is_object(client, parsed.bucket, key) else _s3_keys(client, parsed.bucket, key + "/")
        if not keys:
            raise StorageError(uri, "no objects at this location")
        if keys == [key]:
            return _download_object(client, parsed, key, _cache_child(target, PurePosixPath(key).name, key, uri))
        for item in keys:
            # Keys are listed under `key + "/"`: drop exactly that separator, so "prefix//x" stays absolute-looking.
            _download_object(client, parsed, item, _cache_child(target, item[len(key) :][1:], item, uri))
        return target
    except StorageError:
        raise
    except Exception as error:  # botocore raises many unrelated types; all mean "cannot read"
        raise _storage_error(uri, "cannot download", error) from error


# Answers of S3 (and S3-compatible stores) that mean "not now": trying again later may work.
_BUSY_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"})


def _storage_error(uri: str, doing: str, error: Exception) -> StorageError | StorageUnavailableError:
    """What a failed S3 call means: the store is unreachable or busy now (retried), or the request cannot work."""
    if any(_busy(cause) for cause in _causes(error)):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        return StorageUnavailableError(
            Unavailable.STORAGE, uri, f"{doing}: the store at {endpoint} is unreachable or busy ({error})"
        )
    return StorageError(uri, f"{doing}: {error}")


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps (boto3's transfers wrap botocore's errors in their own)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _busy(error: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError
    from botocore.exceptions import ConnectionError as StoreConnectionError

    if isinstance(error, ClientError):
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or error.response.get("Error", {}).get("Code") in _BUSY_CODES
    return isinstance(error, (StoreConnectionError, ConnectionClosedError, ReadTimeoutError))


def _cache_child(target: Path, relative: str, key: str, uri: str) -> Path:
    """The cache file of object `key`; a key that would land outside the cache folder is refused."""
    try:
        local = inside(target, relative, uri)
    except StorageError as error:
        raise StorageError(uri, f"object key {key!r} leads outside the download folder ({error.problem})") from None
    if local == target:
        raise StorageError(uri, f"object key {key!r} names no file inside the download folder")
    return local


def _download_object(client: Any, parsed: ParsedUri, key: str, local: Path) -> Path:
    local.parent.mkdir(parents=True, exist_ok=True)
    client.download_file(parsed.bucket, key, str(local))
    return local


def _is_object(client: Any, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise
    return True


def download_s3_files(uri: str, names: tuple[str, ...], settings: RuntimeSettings) -> Path:
    """Copy the files `names` of the s3:// folder `uri` that exist there (and nothing else) to a cache folder.

    For what reads a few small files of a model (its config.json, its tokenizer) and never its weights.
    """
    parsed = parse_uri(uri)
    target = cache_folder(uri, settings, kind="s3-files")
    prefix = parsed.key.rstrip("/")
    client = s3_client()
    try:
        for name in names:
            key = f"{prefix}/{name}" if prefix else name
            local = _cache_child(target, name, key, uri)
            local.unlink(missing_ok=True)  # a file deleted from the bucket since must not linger
            if _is_object(client, parsed.bucket, key):
                _download_object(client, parsed, key, local)
    except StorageError:
        raise
    except Exception as error:  # botocore raises many unrelated types; all mean "cannot read"
        raise _storage_error(uri, "cannot download", error) from error
    target.mkdir(parents=True, exist_ok=True)
    return target


def fetch(uri: str, settings: RuntimeSettings) -> Path:
    """A local path holding the contents of `uri` (downloaded first when remote)."""
    parsed = parse_uri(uri)
    if parsed.scheme == "s3":
        return download_s3(uri, settings)
    return local_path(uri, settings)


def upload_directory(local: Path, uri: str) -> None:
    """Copy a local folder to an s3:// prefix, keeping relative paths; no symlink may lead out of it."""
    escaping = _escaping_link(local, local.resolve())
    if escaping is not None:
        raise StorageError(uri, f"cannot upload: {escaping} is a symlink that leads outside {local}")
    parsed = parse_uri(uri)
    client = s3_client()
    prefix = parsed.key.rstrip("/")
    try:
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            relative = path.relative_to(local).as_posix()
            client.upload_file(str(path), parsed.bucket, f"{prefix}/{relative}" if prefix else relative)
    except Exception as error:
        raise _storage_error(uri, "cannot upload", error) from error


def join_uri(base: str, *parts: str) -> str:
    """`base` with path segments appended, keeping its scheme."""
    return "/".join([base.rstrip("/"), *parts])
