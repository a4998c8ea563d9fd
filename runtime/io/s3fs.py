"""A pyarrow S3 filesystem configured like boto3 (endpoint and credentials from the environment).

Ray Train writes checkpoints through pyarrow; this makes an s3:// output on any
S3-compatible store (MinIO, Ceph, ...) work the same way as the rest of the runtime.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from .storage import s3_endpoint


def arrow_s3_filesystem() -> Any:
    from pyarrow import fs

    options: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        options["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            options["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return fs.S3FileSystem(**options)
