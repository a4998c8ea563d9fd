"""Reading and writing run URIs: file://, plain paths, pvc://<claim>/<path> and s3://<bucket>/<key>.

S3 access uses boto3 with the endpoint and credentials of the environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), so
any S3-compatible store works. Remote objects are copied to the cache before use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .contract.common import URI_SCHEMES
from .errors import StorageError
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


def local_path(uri: str, settings: RuntimeSettings) -> Path:
    """The filesystem path of a file://, pvc:// or plain-path URI."""
    parsed = parse_uri(uri)
    if parsed.scheme == "pvc":
        claim, _, path = parsed.location.partition("/")
        return settings.pvc_root / claim / path
    if parsed.scheme in LOCAL_SCHEMES:
        return Path(parsed.location)
    raise StorageError(uri, f"{parsed.scheme}:// is not a local location")


def anchored(uri: str | None, base: Path) -> str | None:
    """A plain relative path made absolute against `base` (Ray workers run in other folders)."""
    if uri is None or "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment; AWS_ENDPOINT_URL_S3 wins over the generic one, as in the AWS SDKs."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client() -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint())


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
            local = target / Path(key).name
            local.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(parsed.bucket, key, str(local))
            return local
        for item in keys:
            local = target / item[len(key) :].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(parsed.bucket, item, str(local))
        return target
    except StorageError:
        raise
    except Exception as error:  # botocore raises many unrelated types; all mean "cannot read"
        raise StorageError(uri, f"cannot download: {error}") from error


def _is_object(client: Any, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise
    return True


def fetch(uri: str, settings: RuntimeSettings) -> Path:
    """A local path holding the contents of `uri` (downloaded first when remote)."""
    parsed = parse_uri(uri)
    if parsed.scheme == "s3":
        return download_s3(uri, settings)
    return local_path(uri, settings)


def upload_directory(local: Path, uri: str) -> None:
    """Copy a local folder to an s3:// prefix, keeping relative paths."""
    parsed = parse_uri(uri)
    client = s3_client()
    prefix = parsed.key.rstrip("/")
    try:
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            relative = path.relative_to(local).as_posix()
            client.upload_file(str(path), parsed.bucket, f"{prefix}/{relative}" if prefix else relative)
    except Exception as error:
        raise StorageError(uri, f"cannot upload: {error}") from error


def join_uri(base: str, *parts: str) -> str:
    """`base` with path segments appended, keeping its scheme."""
    return "/".join([base.rstrip("/"), *parts])
