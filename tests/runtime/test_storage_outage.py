"""Object storage that does not answer is an outage to retry, not a spec that can never work."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kubetune.runtime.contract.report import Unavailable
from kubetune.runtime.io.errors import StorageError, StorageUnavailableError, unavailable_cause
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.io.storage import download_s3, s3_client, upload_directory

from .s3server import S3_ENVIRONMENT, s3_endpoint

pytestmark = pytest.mark.runtime
__all__ = ["s3_endpoint"]  # a fixture, used by name


class _Busy(BaseHTTPRequestHandler):
    """An S3 endpoint whose every answer is 503 Service Unavailable."""

    def _busy(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = do_POST = _busy  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def outage(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[str]:
    """AWS_ENDPOINT_URL at a closed port ("refused") or at a server that answers 503 ("busy")."""
    for name, value in S3_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own retries, kept short here
    if request.param == "refused":
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        yield request.param
        return
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield request.param
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("outage", ["refused", "busy"], indirect=True)
def test_an_unreachable_or_busy_store_is_unavailable_for_both_directions(outage: str, tmp_path: Path) -> None:
    (tmp_path / "variant").mkdir()
    (tmp_path / "variant" / "config.json").write_text("{}")
    for attempt in (
        lambda: download_s3("s3://data/train.jsonl", RuntimeSettings(cache_dir=tmp_path / "cache")),
        lambda: upload_directory(tmp_path / "variant", "s3://runs/support/variants/full"),
    ):
        with pytest.raises(StorageUnavailableError) as raised:
            attempt()
        assert raised.value.what == Unavailable.STORAGE
        assert "unreachable or busy" in raised.value.problem
        assert unavailable_cause(raised.value) is raised.value  # what the entry point reports


def test_a_location_that_does_not_exist_stays_a_spec_problem(s3_endpoint: str, tmp_path: Path) -> None:
    s3_client().create_bucket(Bucket="present")
    for uri in ("s3://present/nothing-here", "s3://absent-bucket/train.jsonl"):
        with pytest.raises(StorageError) as raised:
            download_s3(uri, RuntimeSettings(cache_dir=tmp_path / "cache"))
        assert not isinstance(raised.value, StorageUnavailableError)
        assert raised.value.where == uri
