"""The server process: gRPC and the OpenAI HTTP API over one AsyncEngine, from start to exit.

Two front ends, one engine, one admission path (``serving/admission.py``): the
grpc.aio server and a uvicorn server (``serving/openai/``) run in the same event
loop, on the same host, with the same API key and TLS files.

Life of a server (``InferenceServer.run``):

1. bind the gRPC port (TLS/mTLS when configured), the HTTP port and the metrics
   port, all on ``host`` (127.0.0.1 unless told otherwise); gRPC health says
   NOT_SERVING and ``GET /health`` 503;
2. load the engine off the event loop, start its step loop, send one warm-up
   request through it, read the chat template; only then both healths say SERVING;
3. serve until SIGTERM/SIGINT or an engine failure (a request that sees it, or
   the watcher that polls ``engine.failure`` ten times a second, so a step loop
   that dies with nothing in flight is noticed too);
4. drain: both healths turn unhealthy at once, new calls get UNAVAILABLE / 503,
   calls in flight get up to ``grace_s`` to finish; then both servers stop, the
   engine shuts down and ``run`` returns the exit code: 0 after a drain, 1
   after an engine failure (or a load failure).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.admission import Admission, AdmissionLimits
from serving.auth import ApiKeyInterceptor, TlsFiles
from serving.binding import EngineBinding, EngineFactory
from serving.metrics import MetricsHttpServer, ServingMetrics
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc
from serving.servicer import InferenceServicer

log = logging.getLogger("energon.serving")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (see port_file)
    metrics_port: int | None = 9090  # None: no metrics endpoint; 0: a free port
    api_key: str | None = field(default=None, repr=False)  # never printed
    tls: TlsFiles | None = None
    max_receive_bytes: int = 4 * 1024 * 1024
    grace_s: float = 30.0
    warmup: bool = True
    port_file: Path | None = None  # JSON {"port", "metrics_port", "http_port"} written once bound
    http_port: int | None = 8000  # the OpenAI HTTP API; None: off; 0: a free port
    served_model_name: str | None = None  # default: --model as given, or DEMO_MODEL_NAME
    chat_template: Path | None = None  # overrides the checkpoint's template
    limits: AdmissionLimits = field(default_factory=AdmissionLimits)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in [0, 65535]")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port={self.http_port} must be in [0, 65535]")
        if self.served_model_name == "":
            raise ValueError("served_model_name must not be empty when given")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port={self.metrics_port} must be in [0, 65535]")
        if self.max_receive_bytes < 1024:
            raise ValueError(f"max_receive_bytes={self.max_receive_bytes} must be >= 1024")
        if self.grace_s < 0:
            raise ValueError(f"grace_s={self.grace_s} must be >= 0")
        if self.api_key == "":
            raise ValueError("api_key must not be empty when given")


class InferenceServer:
    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._binding: EngineBinding | None = None
        self._metrics = ServingMetrics(lambda: self._binding.engine.stats if self._binding else None)
        self._health = health.aio.HealthServicer()
        self._stop = asyncio.Event()
        self._health_task: asyncio.Task | None = None
        self._exit_code = 0
        self._admission = Admission(self._metrics, self._engine_failed, config.limits)
        self._servicer = InferenceServicer(self._admission)
        self._openai: Any = None  # OpenAIService, when the HTTP API is on
        self._watch_task: asyncio.Task | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None

    # -- events --------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """SIGTERM/SIGINT: begin draining (idempotent)."""
        if not self._stop.is_set():
            log.info("stop requested: draining")
            self._begin_drain()

    def _engine_failed(self, exc: BaseException) -> None:
        if self._exit_code == 0:
            log.error("engine failure, shutting down: %r", exc)
        self._exit_code = 1
        self._admission.mark_failed()
        self._begin_drain()

    def _begin_drain(self) -> None:
        self._admission.start_draining()
        # NOT_SERVING before anything else; the health servicer refuses later changes.
        # (Keep the task: the event loop holds only a weak reference to it.)
        if self._health_task is None:
            self._health_task = asyncio.get_running_loop().create_task(self._health.enter_graceful_shutdown())
        self._stop.set()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    # -- the whole life --------------------------------------------------------------------
    async def run(self, factory: EngineFactory, model: str | None, engine_kwargs: dict[str, Any]) -> int:
        server = self._build_grpc_server()
        metrics_http = None
        http = None
        await self._set_health(_NOT_SERVING)
        await server.start()
        try:
            if self._config.http_port is not None:
                http = self._build_http_server(model)
                await http.start()
                self.http_port = http.port
            if self._config.metrics_port is not None:
                metrics_http = MetricsHttpServer(self._metrics.registry, self._config.host, self._config.metrics_port)
                self.metrics_port = metrics_http.port
            self._write_port_file()
            self._install_signal_handlers()
            log.info(
                "listening on %s: gRPC port %d, HTTP port %s, metrics port %s; loading the model",
                self._config.host, self.port, self.http_port, self.metrics_port,
            )  # fmt: skip
            if not await self._load(factory, model, engine_kwargs):
                self._exit_code = 1
            else:
                await self._stop.wait()
            await self._drain(server, http)
        finally:
            if self._watch_task is not None:
                self._watch_task.cancel()
            await server.stop(0)
            if http is not None:
                await http.stop()
            if self._binding is not None:
                await asyncio.to_thread(self._binding.engine.shutdown)
            if metrics_http is not None:
                metrics_http.close()
        log.info("server stopped with exit code %d", self._exit_code)
        return self._exit_code

    def _build_grpc_server(self) -> aio.Server:
        c = self._config
        interceptors = [ApiKeyInterceptor(c.api_key)] if c.api_key else []
        options = [
            ("grpc.max_receive_message_length", c.max_receive_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_InferenceServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = f"{c.host}:{c.port}"
        try:
            if c.tls is not None:
                self.port = server.add_secure_port(address, c.tls.server_credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as e:  # grpc reports a failed bind as RuntimeError
            raise OSError(f"cannot listen on {address} (in use, or not an address of this host)") from e
        return server

    def _build_http_server(self, model: str | None) -> Any:
        from serving.openai.app import DEMO_MODEL_NAME, OpenAIService, build_app
        from serving.openai.http_server import HttpFrontEnd

        c = self._config
        name = c.served_model_name or (model if model else DEMO_MODEL_NAME)
        self._openai = OpenAIService(
            self._admission, served_model_name=name, api_key=c.api_key, chat_template_file=c.chat_template
        )
        app = build_app(self._openai, self._metrics, max_body_bytes=c.max_receive_bytes)
        return HttpFrontEnd(app, c.host, c.http_port, c.tls)

    def _write_port_file(self) -> None:
        if self._config.port_file is not None:
            tmp = self._config.port_file.with_suffix(".tmp")
            ports = {"port": self.port, "metrics_port": self.metrics_port, "http_port": self.http_port}
            tmp.write_text(json.dumps(ports))
            tmp.replace(self._config.port_file)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def _load(self, factory: EngineFactory, model: str | None, engine_kwargs: dict[str, Any]) -> bool:
        try:
            binding = await asyncio.to_thread(factory, model, engine_kwargs)
            self._binding = binding
            binding.engine.start()
            if self._config.warmup:
                await self._warm_up(binding)
            if self._openai is not None:
                await asyncio.to_thread(self._openai.load_model_files, getattr(binding.engine.info, "model", None))
        except Exception as e:
            log.error("loading the engine failed: %r", e)
            return False
        if self._stop.is_set():  # asked to stop while loading
            return True
        self._admission.attach(binding)
        await self._set_health(_SERVING)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_engine(binding))
        api = f" and the OpenAI API as {self._openai.model_name!r}" if self._openai else ""
        log.info("serving %s%s", SERVICE_NAME, api)
        return True

    async def _watch_engine(self, binding: EngineBinding, period_s: float = 0.1) -> None:
        """Notice a step loop that died with nothing in flight (no request would see it)."""
        while not self._stop.is_set():
            failure = getattr(binding.engine, "failure", None)
            if failure is not None:
                self._engine_failed(failure)
                return
            await asyncio.sleep(period_s)

    async def _warm_up(self, binding: EngineBinding) -> None:
        """One tiny request through the whole path, so the first client pays no compile.

        A decoder gets a one-token greedy generation; a model that refuses it with a
        ValueError (an encoder) gets one embedding instead. If that fails too, the
        model cannot serve and loading fails.
        """
        params = binding.params_cls(max_tokens=1, temperature=0.0)
        try:
            async for delta in binding.engine.submit([1], params, request_id=f"warmup-{uuid.uuid4().hex}"):
                if delta.finished:
                    return
        except ValueError as generate_error:
            log.info("warm-up: generation refused (%s); warming up embeddings", generate_error)
            await binding.engine.embed(["warm-up"], normalize=True)

    async def _drain(self, server: aio.Server, http: Any) -> None:
        grace = self._config.grace_s if self._exit_code == 0 else min(self._config.grace_s, 5.0)
        if not await self._admission.wait_idle(grace):
            log.warning("%d calls still in flight after %.1f s; cancelling them", self._admission.inflight, grace)
        await server.stop(0)
        if http is not None:
            await http.stop()


async def serve(config: ServerConfig, factory: EngineFactory, model: str | None, engine_kwargs: dict[str, Any]) -> int:
    return await InferenceServer(config).run(factory, model, engine_kwargs)
