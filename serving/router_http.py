"""``energon router --http-port``: the OpenAI HTTP API in front of prefill and decode servers.

The same app as ``energon serve``'s (``serving/openai/``) over a ``GrpcEngine`` whose endpoint
is the router's own gRPC port, so both protocols share one routing path (``router.py``).
Start-up, in the router's main thread (gRPC already serving on its own threads):

1. ask ``ModelInfo`` through the router (it answers from a prefill server) until one answers;
2. read the tokenizer and chat template from the checkpoint directory (``--model``, else
   the path the prefill server reports, which must then exist here) and check that this
   tokenizer and the prefill server's agree on a probe text (a different checkpoint would
   feed the servers wrong ids);
3. bind the HTTP port and serve until ``stop`` is set; then drain for up to ``grace_s``.

``GET /health`` follows the router's gRPC health (polled every ``health_interval_s``): 503
``unavailable`` while no server of one role is up, and new requests get 503 at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from serving.admission import Admission, Unavailable
from serving.binding import EngineBinding
from serving.grpc_engine import GrpcEngine
from serving.metrics import ServingMetrics

log = logging.getLogger("energon.serving.router")

PROBE_TEXT = "energon router: does this tokenizer match? 1234 Hello, world!"


@dataclass(frozen=True)
class RouterHttpConfig:
    grpc_target: str  # the router's own gRPC endpoint
    host: str
    port: int  # 0: a free port
    model: str | None = None  # checkpoint directory for the tokenizer; None: what the prefill server reports
    served_model_name: str | None = None  # default: the checkpoint path
    chat_template: Path | None = None  # overrides the checkpoint's
    grace_s: float = 10.0
    info_timeout_s: float = 5.0  # per ModelInfo attempt
    health_interval_s: float = 0.5
    api_key: str | None = dataclasses.field(default=None, repr=False)  # clients' key (HTTP and the loopback hop)
    tls: Any = None  # auth.TlsFiles for the HTTP port


def _load_tokenizer(root: Path) -> Any:
    from energon_jax.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(root) if (root / "tokenizer.json").is_file() else None


async def _connect(config: RouterHttpConfig, stop: asyncio.Event) -> GrpcEngine | None:
    """The engine adapter once a prefill server has answered ``ModelInfo`` (None: stopped first)."""
    from serving.auth import aio_key_interceptors

    channel = aio.insecure_channel(config.grpc_target, interceptors=aio_key_interceptors(config.api_key))
    while not stop.is_set():
        try:
            info = await GrpcEngine.model_info(channel, config.info_timeout_s)
            break
        except Unavailable as e:
            log.info("HTTP API waits for a prefill server: %s", e)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    else:
        await channel.close()
        return None
    root = Path(config.model or info.model)
    if not (root / "config.json").is_file():
        await channel.close()
        raise ValueError(f"--model={str(root)!r} is not a checkpoint directory here (no config.json): give --model, "
                         "the directory the servers load, for the tokenizer and chat template")
    tokenizer = await asyncio.to_thread(_load_tokenizer, root)
    engine = GrpcEngine(channel, info, tokenizer)
    if tokenizer is not None:
        local = await asyncio.to_thread(tokenizer.encode, PROBE_TEXT)
        try:
            remote = await engine.remote_tokenize(PROBE_TEXT)
        except ValueError as e:
            remote = f"refused ({e})"
        if local != remote:
            await engine.close()
            raise ValueError(f"--model={str(root)!r}: its tokenizer and the prefill server's disagree on "
                             f"{PROBE_TEXT!r} ({local} here, {remote} there): give --model the checkpoint the "
                             "servers load")
    return engine


async def _follow_health(channel: aio.Channel, admission: Admission, config: RouterHttpConfig) -> None:
    """The router's gRPC health -> ``admission.set_unavailable`` (so -> ``GET /health``)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=config.info_timeout_s)
            up = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            up = False
        admission.set_unavailable(None if up else "no prefill or no decode server is up behind this router")
        await asyncio.sleep(config.health_interval_s)


async def serve_http(config: RouterHttpConfig, stop: asyncio.Event, on_listening: Callable[[int], None]) -> int:
    """Serve the OpenAI API until ``stop``; 0 after a drain, 2 when it could not start."""
    from energon_jax.request import QueueFullError, SamplingParams
    from serving.openai.app import OpenAIService, build_app
    from serving.openai.http_server import HttpFrontEnd

    try:
        engine = await _connect(config, stop)
    except ValueError as e:
        log.error("%s", e)
        return 2
    if engine is None:
        return 0
    metrics = ServingMetrics(lambda: None)
    # A request that fails with an unexpected status is that request's failure (503); the
    # servers behind the router keep serving, so the router does not stop.
    admission = Admission(metrics, lambda e: log.error("routed request failed: %r", e))
    root = config.model or engine.info.model
    service = OpenAIService(admission, served_model_name=config.served_model_name or root,
                            chat_template_file=config.chat_template, api_key=config.api_key)
    try:
        await asyncio.to_thread(service.load_model_files, root)
        http = HttpFrontEnd(build_app(service, metrics), config.host, config.port, config.tls)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        await engine.close()
        return 2
    admission.attach(EngineBinding(engine=engine, params_cls=SamplingParams, queue_full_error=QueueFullError))
    watch = asyncio.get_running_loop().create_task(_follow_health(engine.channel, admission, config))
    await http.start()
    log.info("OpenAI HTTP API on %s:%d as %r", config.host, http.port, service.model_name)
    on_listening(http.port)
    await stop.wait()
    watch.cancel()
    admission.start_draining()
    if not await admission.wait_idle(config.grace_s):
        log.warning("%d HTTP calls still in flight after %.1f s; cancelling them", admission.inflight, config.grace_s)
    await http.stop()
    await engine.close()
    return 0
