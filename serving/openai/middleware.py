"""ASGI middleware of the HTTP API: a body-size limit and per-route request counters."""

from __future__ import annotations

from typing import Any

from serving.openai import errors
from serving.openai import protocol as p


class BodyLimit:
    """ASGI middleware: a body whose Content-Length exceeds the limit gets 413 before it is read."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self._app = app
        self._max = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or ()).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self._max:
                message = f"request body of {int(length)} bytes is larger than {self._max} (--max-message-bytes)"
                body = p.ErrorBody(message=message, type="invalid_request_error", code="request_too_large")
                await errors.error_response(413, body)(scope, receive, send)
                return
        await self._app(scope, receive, send)


class RequestCounter:
    """ASGI middleware: count HTTP requests by method, route and status (no per-URL labels)."""

    def __init__(self, app: Any, counter: Any) -> None:
        self._app = app
        self._counter = counter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_counting(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_counting)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self._counter.labels(scope.get("method", ""), path, str(status["code"])).inc()
