"""HTTP connections to the API server, for `Kube` only: keep-alive, one host, thread-safe.

A thin layer over the standard library's http.client. Every reconcile is a handful
of small requests, and on a busy operator the client's own CPU per request matters
(it is what `bench/kube_client.py` measures): this layer costs about half of what
urllib3 costs per request and a third of the kubernetes package's ApiClient.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass

# What the connections raise when the server cannot be reached or ends a connection early.
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (OSError, http.client.HTTPException)
# What a keep-alive connection the server closed while it was idle gives on its next request: over TLS,
# writing to it may end in an SSL EOF rather than a reset.
_STALE = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
    ssl.SSLEOFError,
)


@dataclass(frozen=True)
class Endpoint:
    """Where the API server is and how to reach it; a change (renewed certificates) means new connections."""

    server: str  # scheme://host[:port][/path]
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    server_name: str | None = None  # the name to verify the certificate against, when not the host's
    proxy: str | None = None  # http://proxy:port, through which https servers are tunnelled


@dataclass(frozen=True)
class Response:
    status: int
    headers: http.client.HTTPMessage
    data: bytes


class _TlsConnection(http.client.HTTPSConnection):
    """HTTPS that may verify the certificate against another name than the host's (kubeconfig tls-server-name)."""

    def __init__(self, host: str, port: int | None, context: ssl.SSLContext, server_name: str | None, timeout: float):
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP, and the proxy tunnel if any
        tunnelled: str | None = getattr(self, "_tunnel_host", None)
        name = self._server_name or tunnelled or self.host
        self.sock = self._context.wrap_socket(self.sock, server_hostname=name)  # type: ignore[attr-defined]


class Stream:
    """A long-lived response (a watch) on a connection of its own; `interrupt` may be called from any thread."""

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        self._connection, self.response = connection, response

    def read(self, size: int = 64 * 1024) -> bytes:
        """What has arrived (up to `size` bytes), waiting for at least one; b"" at the end."""
        return self.response.read1(size)

    def interrupt(self) -> None:
        """End the stream from another thread: its reader wakes up to an error (the reader closes it)."""
        sock = self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._connection.close()


class Connections:
    """A pool of keep-alive connections to one API server."""

    def __init__(self, endpoint: Endpoint, size: int = 32, timeout: float = 60.0) -> None:
        self.endpoint, self.size, self.timeout = endpoint, size, timeout
        parts = urllib.parse.urlsplit(endpoint.server)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname or "localhost", parts.port
        self.base = parts.path.rstrip("/")  # a server behind a path: requests go below it
        self._context = _context(endpoint) if self._https else None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Response:
        """One request and its whole answer. Raises OSError or http.client.HTTPException when unreachable."""
        target = self.base + path
        connection, reused = self._take()
        try:
            response = self._exchange(connection, method, target, body, headers)
        except _STALE:
            connection.close()
            if not reused:
                raise
            connection, reused = self._new(self.timeout), False  # closed while idle: once more, afresh
            response = self._exchange(connection, method, target, body, headers)
        except BaseException:
            connection.close()
            raise
        self._give_back(connection)
        return response

    def stream(self, method: str, path: str, headers: dict[str, str], read_timeout: float) -> Stream:
        """A response to read as it arrives, on a new connection (closed with the stream)."""
        connection = self._new(read_timeout)
        try:
            connection.request(method, self._target(self.base + path), headers=headers)
            return Stream(connection, connection.getresponse())
        except BaseException:
            connection.close()
            raise

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _exchange(
        self,
        connection: http.client.HTTPConnection,
        method: str,
        target: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> Response:
        connection.request(method, self._target(target), body=body, headers=headers)
        answer = connection.getresponse()
        data = answer.read()
        if answer.will_close:
            connection.close()
        return Response(answer.status, answer.headers, data)

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._new(self.timeout), False

    def _give_back(self, connection: http.client.HTTPConnection) -> None:
        if connection.sock is None:  # closed: the server ends it after this answer
            return
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(connection)
                return
        connection.close()

    def _new(self, timeout: float) -> http.client.HTTPConnection:
        endpoint = self.endpoint
        if endpoint.proxy:
            proxy = urllib.parse.urlsplit(endpoint.proxy)
            host, port = proxy.hostname or "localhost", proxy.port
        else:
            host, port = self._host, self._port
        connection: http.client.HTTPConnection
        if self._https:
            assert self._context is not None
            connection = _TlsConnection(host, port, self._context, endpoint.server_name, timeout)
            if endpoint.proxy:
                connection.set_tunnel(self._host, self._port)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
        return connection

    def _target(self, path: str) -> str:
        if self.endpoint.proxy and not self._https:  # a plain-HTTP proxy takes the absolute URL
            port = f":{self._port}" if self._port else ""
            return f"http://{self._host}{port}{path}"
        return path


def _context(endpoint: Endpoint) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=endpoint.ca_file)
    if not endpoint.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if endpoint.cert_file and endpoint.key_file:
        context.load_cert_chain(endpoint.cert_file, endpoint.key_file)
    return context
