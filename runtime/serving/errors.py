"""Errors of the serving replica as JSON in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A request the endpoint refuses: the HTTP status, the message, and the parameter at fault.

    `retry_after` (seconds) goes out as a `Retry-After` header: the request may succeed when repeated later.
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        retry_after: int | None = None,
    ):
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.retry_after = retry_after
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param)

    def headers(self) -> dict[str, str] | None:
        headers = {}
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="kubetune"'
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers or None


def error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
