"""An asyncio client for ``energon.v1.Inference``.

``InferenceClient`` opens one channel (plain, TLS or mutual TLS) and attaches
the API key, when given, as ``authorization: Bearer`` metadata on each call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class ClientConfig:
    target: str = "127.0.0.1:50051"
    api_key: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None  # set: use TLS, trusting this CA
    tls_cert: Path | None = None  # client certificate, for mutual TLS
    tls_key: Path | None = None
    server_name: str | None = None  # override the name checked against the certificate
    max_receive_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("a client certificate (tls_cert) needs tls_ca to verify the server")


def open_channel(config: ClientConfig) -> aio.Channel:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", config.max_receive_bytes)]
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    if config.tls_ca is None:
        return aio.insecure_channel(config.target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(config.tls_ca).read_bytes(),
        private_key=Path(config.tls_key).read_bytes() if config.tls_key else None,
        certificate_chain=Path(config.tls_cert).read_bytes() if config.tls_cert else None,
    )
    return aio.secure_channel(config.target, creds, options=options)


def sampling_params(**fields: Any) -> pb.SamplingParams:
    """``pb.SamplingParams`` from keyword arguments; None values stay unset (engine default)."""
    return pb.SamplingParams(**{k: v for k, v in fields.items() if v is not None})


def generate_request(
    prompt: str | Sequence[int], params: pb.SamplingParams | None = None, request_id: str = "",
    cache_salt: str | None = None,
) -> pb.GenerateRequest:
    """``cache_salt``: share prefix-cache pages only with requests of the same salt."""
    req = pb.GenerateRequest(request_id=request_id, params=params or pb.SamplingParams(), cache_salt=cache_salt)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.SetInParent()  # an empty list is still a (bad) prompt, not a missing one
        req.token_ids.ids.extend(int(t) for t in prompt)
    return req


class InferenceClient:
    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._channel = open_channel(config)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (("authorization", f"Bearer {config.api_key}"),) if config.api_key else None

    async def __aenter__(self) -> InferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def generate(
        self,
        prompt: str | Sequence[int],
        params: pb.SamplingParams | None = None,
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> aio.UnaryStreamCall:
        """The streaming call; iterate it (``async for resp in call``) or ``call.cancel()`` it."""
        request = generate_request(prompt, params, request_id)
        return self._stub.Generate(request, timeout=timeout, metadata=self._metadata)

    async def generate_all(
        self, prompt: str | Sequence[int], params: pb.SamplingParams | None = None, **kw: Any
    ) -> list[pb.GenerateResponse]:
        return [resp async for resp in self.generate(prompt, params, **kw)]

    async def embed(
        self, texts: Sequence[str], normalize: bool = True, timeout: float | None = None
    ) -> list[list[float]]:
        request = pb.EmbedRequest(texts=list(texts), normalize=normalize)
        resp = await self._stub.Embed(request, timeout=timeout, metadata=self._metadata)
        return [list(e.values) for e in resp.embeddings]

    async def tokenize(self, text: str, timeout: float | None = None) -> list[int]:
        resp = await self._stub.Tokenize(pb.TokenizeRequest(text=text), timeout=timeout, metadata=self._metadata)
        return list(resp.token_ids)

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfoResponse:
        return await self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    async def health(self, service: str = "", timeout: float | None = None) -> int:
        """The health status (``health_pb2.HealthCheckResponse.SERVING`` etc.); no API key needed."""
        resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return resp.status

