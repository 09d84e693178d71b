"""API keys and TLS for the servers (``energon serve``, its prefill/decode roles, ``energon router``).

The API key travels as ``authorization: Bearer <key>`` metadata and is checked
with ``secrets.compare_digest`` on every method except the gRPC health service
(load balancers probe it without credentials). The key is held only by the
interceptor and never formatted into a log line or an error message.
``ApiKeyInterceptor`` guards a ``grpc.aio`` server, ``SyncApiKeyInterceptor`` a
thread-pool one; ``key_metadata_interceptor`` adds a key to every call of a
client channel (the router's calls to its backends).
"""

from __future__ import annotations

import collections
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio

API_KEY_ENV = "ENERGON_API_KEY"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_BEARER = "bearer "


def _like(handler: grpc.RpcMethodHandler, unary: Callable, stream: Callable) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind and serializers running ``unary`` (single response) or ``stream``."""
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(stream, **kw)


def _abort_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that rejects the call unauthenticated."""

    async def reject(request_or_iterator, context: aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

    async def reject_stream(request_or_iterator, context: aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")
        yield  # pragma: no cover - makes this an async generator, as stream handlers are

    return _like(handler, reject, reject_stream)


def _bearer_matches(metadata: tuple | None, key: bytes) -> bool:
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str) and value.lower().startswith(_BEARER):
            return secrets.compare_digest(value[len(_BEARER) :].encode(), key)
    return False


class ApiKeyInterceptor(aio.ServerInterceptor):
    def __init__(self, api_key: str) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self._key = api_key.encode()

    def __repr__(self) -> str:  # never show the key
        return "ApiKeyInterceptor(<redacted>)"

    def _authorized(self, metadata: tuple | None) -> bool:
        return _bearer_matches(metadata, self._key)

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


def _sync_abort_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``_abort_handler`` for a thread-pool server."""

    def reject(request_or_iterator, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

    def reject_stream(request_or_iterator, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")
        yield  # pragma: no cover - a generator, as stream handlers are

    return _like(handler, reject, reject_stream)


class SyncApiKeyInterceptor(grpc.ServerInterceptor):
    """``ApiKeyInterceptor`` for ``grpc.server`` (the role servers and the router)."""

    def __init__(self, api_key: str) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self._key = api_key.encode()

    def __repr__(self) -> str:
        return "SyncApiKeyInterceptor(<redacted>)"

    def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_HEALTH_PREFIX):
            return handler
        if _bearer_matches(handler_call_details.invocation_metadata, self._key):
            return handler
        return _sync_abort_handler(handler)


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


class _AddKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self._entry = ("authorization", f"Bearer {api_key}")

    def __repr__(self) -> str:
        return "_AddKey(<redacted>)"

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(d.method, d.timeout, (*(d.metadata or ()), self._entry), d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


def key_metadata_interceptor(api_key: str) -> grpc.UnaryUnaryClientInterceptor:
    """For ``grpc.intercept_channel``: every unary and server-streaming call carries the key."""
    if not api_key:
        raise ValueError("api_key must not be empty")
    return _AddKey(api_key)


class _AioKey:
    def __init__(self, api_key: str) -> None:
        self._entry = ("authorization", f"Bearer {api_key}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<redacted>)"

    def _details(self, d: aio.ClientCallDetails) -> aio.ClientCallDetails:
        return aio.ClientCallDetails(d.method, d.timeout, aio.Metadata(*(d.metadata or ()), self._entry),
                                     d.credentials, d.wait_for_ready)


class _AioUnaryKey(_AioKey, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioStreamKey(_AioKey, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def aio_key_interceptors(api_key: str | None) -> list:
    """For ``aio.insecure_channel(..., interceptors=...)``: every unary and server-streaming call
    carries the key (none: []). Two objects: an aio channel files each interceptor under one kind."""
    return [_AioUnaryKey(api_key), _AioStreamKey(api_key)] if api_key else []


def tls_from_flags(cert: Path | None, key: Path | None, client_ca: Path | None) -> TlsFiles | None:
    """``--tls-cert/--tls-key/--tls-client-ca`` as ``TlsFiles`` (None: plaintext), checked together."""
    if cert or key:
        if not (cert and key):
            raise ValueError("--tls-cert and --tls-key must be given together")
        return TlsFiles(cert, key, client_ca)
    if client_ca:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    return None


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
