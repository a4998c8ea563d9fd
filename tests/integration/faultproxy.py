"""A recording, fault-injecting proxy in front of the test API server.

The operator under test talks plain HTTP to the proxy, with no credentials; the
proxy forwards each request to the real API server with the admin client
certificate, streaming watch responses as they arrive. Every request is recorded
(method, path, query, Accept header, time, the status answered), and a test may
have some requests answered with an error instead (409, 429 with Retry-After, 500).
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from kubetune.operator.kube import load_configuration

# Hop-by-hop headers, and those the proxy sets itself.
_DROPPED = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "authorization"}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    accept: str
    at: float
    status: int = 0

    @property
    def watch(self) -> bool:
        return self.query.get("watch") == "true"


@dataclass
class Fault:
    """Answer the next requests matching `method` and `path` (a regular expression) with these statuses."""

    method: str
    path: str
    statuses: list[int]
    retry_after: int | None = None  # seconds, sent with 429
    answered: list[int] = field(default_factory=list)

    def take(self, method: str, path: str) -> int | None:
        if method != self.method or not re.fullmatch(self.path, path) or not self.statuses:
            return None
        status = self.statuses.pop(0)
        self.answered.append(status)
        return status


class FaultProxy:
    def __init__(self, kubeconfig: Path) -> None:
        config = load_configuration(str(kubeconfig))
        upstream = urllib.parse.urlsplit(config.host)
        self._upstream = (upstream.hostname or "127.0.0.1", upstream.port or 443)
        self._context = ssl.create_default_context(cafile=config.ssl_ca_cert)
        assert config.cert_file is not None, "the proxy authenticates upstream with the admin certificate"
        self._context.load_cert_chain(config.cert_file, config.key_file)
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPSConnection] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        with self._lock:
            connections = list(self._open)
        for connection in connections:  # ends the watches still streaming
            if connection.sock is not None:
                connection.sock.close()
        self._server.server_close()

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig that reaches the API server through this proxy, with no credentials of its own."""
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "proxy", "cluster": {"server": self.url}}],
            "users": [{"name": "nobody", "user": {}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "nobody"}}],
            "current-context": "proxy",
        }
        path.write_text(yaml.safe_dump(document))
        return path

    def fail(self, method: str, path: str, statuses: list[int], retry_after: int | None = None) -> Fault:
        fault = Fault(method, path, list(statuses), retry_after)
        with self._lock:
            self.faults.append(fault)
        return fault

    def recorded(self, since: int = 0) -> list[Recorded]:
        with self._lock:
            return list(self.requests[since:])

    def _fault_for(self, method: str, path: str) -> tuple[int, int | None] | None:
        with self._lock:
            for fault in self.faults:
                status = fault.take(method, path)
                if status is not None:
                    return status, fault.retry_after
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._forward()

            do_POST = do_PUT = do_PATCH = do_DELETE = do_GET  # noqa: N815

            def _forward(self) -> None:
                split = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(split.query))
                record = Recorded(self.command, split.path, query, self.headers.get("Accept", ""), time.monotonic())
                with proxy._lock:
                    proxy.requests.append(record)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._fault_for(self.command, split.path)
                if fault is not None:
                    record.status = fault[0]
                    self._fail(*fault)
                    return
                upstream = http.client.HTTPSConnection(*proxy._upstream, context=proxy._context, timeout=600)
                with proxy._lock:
                    proxy._open.add(upstream)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROPPED}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    record.status = answer.status
                    self.send_response(answer.status)
                    for key, value in answer.getheaders():
                        if key.lower() not in _DROPPED:
                            self.send_header(key, value)
                    if record.watch:
                        self._stream(answer)
                    else:
                        data = answer.read()
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                except (OSError, http.client.HTTPException):  # either side went away
                    self.close_connection = True
                finally:
                    with proxy._lock:
                        proxy._open.discard(upstream)
                    upstream.close()

            def _stream(self, answer: http.client.HTTPResponse) -> None:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while chunk := answer.read1(65536):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

            def _fail(self, status: int, retry_after: int | None) -> None:
                reason = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError"}.get(status, "Injected")
                data = json.dumps(
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status,
                     "reason": reason, "message": f"injected by the test proxy: {reason}"}
                ).encode()  # fmt: skip
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if retry_after is not None and status == 429:
                    self.send_header("Retry-After", str(retry_after))
                self.end_headers()
                self.wfile.write(data)

        return Handler
