"""API keys and TLS for the server.

The API key travels as ``authorization: Bearer <key>`` metadata and is checked
with ``secrets.compare_digest`` on every method except the gRPC health service
(load balancers probe it without credentials). The key is held only by the
interceptor and never formatted into a log line or an error message.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio

API_KEY_ENV = "ENERGON_API_KEY"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_BEARER = "bearer "


def _abort_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that rejects the call unauthenticated."""

    async def reject(request_or_iterator, context: aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

    async def reject_stream(request_or_iterator, context: aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")
        yield  # pragma: no cover - makes this an async generator, as stream handlers are

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(reject, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(reject_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(reject, **kw)
    return grpc.stream_stream_rpc_method_handler(reject_stream, **kw)


class ApiKeyInterceptor(aio.ServerInterceptor):
    def __init__(self, api_key: str) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self._key = api_key.encode()

    def __repr__(self) -> str:  # never show the key
        return "ApiKeyInterceptor(<redacted>)"

    def _authorized(self, metadata: tuple | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.lower().startswith(_BEARER):
                return secrets.compare_digest(value[len(_BEARER) :].encode(), self._key)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_HEALTH_PREFIX):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        return _abort_handler(handler)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS; ``client_ca`` set means mutual TLS (client certificates required)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS {name} file {str(path)!r} does not exist")
        root = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=root,
            require_client_auth=root is not None,
        )
