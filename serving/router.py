"""``energon router``: the public ``energon.v1.Inference`` service over prefill and decode servers.

Each ``Generate`` call goes to the prefill server with the fewest calls in flight from this
router (``Disagg.Prefill``: first token plus a K/V descriptor), its first response is
streamed to the client at once, then the decode server with the fewest calls in flight
pulls the K/V from the prefill server (``jax.experimental.transfer``, server to server: the
K/V never pass through the router) and streams the rest (``Disagg.Decode``), each response
forwarded as it arrives. Existing clients work unchanged (same proto, same streaming).

Failures: a backend call that ends UNAVAILABLE (the server died) fails the client's call with
UNAVAILABLE and triggers a probe of that backend; a probe (``Disagg.Stats``, every
``probe_interval_s`` and on such failures) that fails takes the backend out of the pick until
a later probe succeeds. gRPC health is SERVING while at least one server of each role is
up, NOT_SERVING otherwise. A client that cancels cancels the backend call in progress, which
aborts the request there (its pages are freed; a prefill's gathered K/V that no decode server
pulls are dropped at the prefill server's pull timeout).

Security: ``api_key`` guards the router's own methods (not health) as ``energon serve``'s does,
``tls`` puts TLS (mutual with a client CA) on its port; the calls to the backends carry
``backend_api_key`` and, with ``backend_tls_ca``, go over TLS verified against that CA.
``RouterMetrics`` (``--metrics-port``): routed requests by outcome, time to the first token
and to the hand-off, and each backend's state.

``Embed``, ``Tokenize`` and ``ModelInfo`` are forwarded as they are to the least-loaded
prefill server. The OpenAI HTTP API (``--http-port``) is ``router_http.py``: a client of
this service on loopback, so both protocols take the same path.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from serving.protos.energon.v1 import disagg_pb2 as dpb
from serving.protos.energon.v1 import disagg_pb2_grpc as dpb_grpc
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("energon.serving.router")

_PASSED_THROUGH = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   grpc.StatusCode.FAILED_PRECONDITION)


def parse_targets(value: str, flag: str) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]`` -> targets; ValueError naming the flag otherwise."""
    targets = [t.strip() for t in value.split(",") if t.strip()]
    for t in targets:
        host, sep, port = t.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{flag}={value!r}: {t!r} must look like HOST:PORT")
    if not targets:
        raise ValueError(f"{flag}={value!r} names no server")
    return targets


@dataclasses.dataclass
class Backend:
    role: str  # "prefill" | "decode"
    target: str
    stub: dpb_grpc.DisaggStub
    infer: pb_grpc.InferenceStub  # the model-level calls (Tokenize, ModelInfo, Embed)
    in_flight: int = 0  # this router's calls to it now
    alive: bool = True


class NoBackend(Exception):
    """No server of a role is up."""


class BackendPool:
    """The prefill and decode servers, their in-flight counts and whether they are up."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str], *, probe_timeout_s: float = 2.0,
                 api_key: str | None = None, tls_ca: Path | None = None) -> None:
        """``api_key``: sent on every backend call; ``tls_ca``: TLS to the backends, verified against it."""
        from serving.auth import key_metadata_interceptor

        if tls_ca is not None and not Path(tls_ca).is_file():
            raise ValueError(f"--backend-tls-ca file {str(tls_ca)!r} does not exist")
        creds = None if tls_ca is None else grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
        self._lock = threading.Lock()
        self._channels = []
        self.backends: list[Backend] = []
        for role, targets in (("prefill", prefill), ("decode", decode)):
            for t in targets:
                ch = grpc.insecure_channel(t) if creds is None else grpc.secure_channel(t, creds)
                self._channels.append(ch)
                if api_key:
                    ch = grpc.intercept_channel(ch, key_metadata_interceptor(api_key))
                self.backends.append(Backend(role, t, dpb_grpc.DisaggStub(ch), pb_grpc.InferenceStub(ch)))
        self.probe_timeout_s = probe_timeout_s
        self.on_change = lambda serving: None  # set by the router: health follows

    def pick(self, role: str) -> Backend:
        with self._lock:
            live = [b for b in self.backends if b.role == role and b.alive]
            if not live:
                raise NoBackend(f"no {role} server is up")
            best = min(live, key=lambda b: b.in_flight)
            best.in_flight += 1
            return best

    def release(self, backend: Backend) -> None:
        with self._lock:
            backend.in_flight -= 1

    def serving(self) -> bool:
        with self._lock:
            return all(any(b.alive for b in self.backends if b.role == r) for r in ("prefill", "decode"))

    def probe(self, backend: Backend) -> bool:
        """Ask the backend for its stats; record whether it answered."""
        try:
            backend.stub.Stats(dpb.StatsRequest(), timeout=self.probe_timeout_s)
            up = True
        except grpc.RpcError as e:
            up = False
            if e.code() == grpc.StatusCode.UNAUTHENTICATED and backend.alive:  # a configuration error: say so
                log.error("%s server %s refuses the router's key: give --backend-api-key", backend.role,
                          backend.target)
        before = self.serving()
        with self._lock:
            if backend.alive != up:
                log.warning("%s server %s is %s", backend.role, backend.target, "up" if up else "down")
            backend.alive = up
        if self.serving() != before:
            self.on_change(not before)
        return up

    def probe_all(self) -> None:
        for b in list(self.backends):
            self.probe(b)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


class RouterMetrics:
    """Prometheus metrics of a router, on their own registry."""

    def __init__(self, pool: BackendPool) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        from serving.metrics import LATENCY_BUCKETS

        self.registry = r = CollectorRegistry()
        self.requests = Counter("energon_router_requests", "Generate calls routed, by outcome (a status code name)",
                                ["outcome"], registry=r)
        self.ttft = Histogram("energon_router_time_to_first_token_seconds",
                              "From the call to the prefill server's first token", buckets=LATENCY_BUCKETS, registry=r)
        self.handoff = Histogram("energon_router_handoff_seconds",
                                 "From the first token to the decode server's first response (K/V pull included)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        r.register(_PoolCollector(pool))


class _PoolCollector:
    def __init__(self, pool: BackendPool) -> None:
        self._pool = pool

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("energon_router_backend_up", "Whether the last probe of a backend answered",
                               labels=["role", "target"])
        busy = GaugeMetricFamily("energon_router_backend_in_flight", "This router's calls to a backend now",
                                 labels=["role", "target"])
        for b in list(self._pool.backends):
            up.add_metric([b.role, b.target], float(b.alive))
            busy.add_metric([b.role, b.target], float(b.in_flight))
        yield up
        yield busy


class RouterServicer(pb_grpc.InferenceServicer):
    def __init__(self, pool: BackendPool, metrics: RouterMetrics | None = None) -> None:
        self._pool = pool
        self._metrics = metrics

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        if self._metrics is None:
            yield from self._generate(request, context, None)
            return
        outcome, finished = "OK", False
        try:
            for resp in self._generate(request, context, self._metrics):
                finished = bool(resp.finish_reason)
                yield resp
        except GeneratorExit:  # the call ended before the handler: cancelled, unless its last response went out
            outcome = "OK" if finished else "CANCELLED"
            raise
        except Exception:  # context.abort: the code it set (a cancel after the final response: OK)
            code = context.code() if hasattr(context, "code") else None
            outcome = "OK" if finished else code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise
        finally:
            self._metrics.requests.labels(outcome).inc()

    def _generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext,
                  metrics: RouterMetrics | None) -> Iterator[pb.GenerateResponse]:
        start = time.monotonic()
        label = request.request_id or uuid.uuid4().hex
        forwarded = pb.GenerateRequest()
        forwarded.CopyFrom(request)
        forwarded.request_id = label  # echoed back in every response
        request = forwarded
        prefill = self._backend("prefill", context)
        try:
            call = prefill.stub.Prefill.future(request)
            context.add_callback(call.cancel)  # a client cancel aborts the prefill (its pages are freed)
            resp = self._result(call, prefill, context)
        finally:
            self._pool.release(prefill)
        first_at = time.monotonic()
        if metrics is not None:
            metrics.ttft.observe(first_at - start)
        yield resp.first
        if not resp.HasField("kv"):  # finished on its first token
            return
        decode = self._backend("decode", context)
        try:
            dreq = dpb.DecodeRequest(
                request=pb.GenerateRequest(request_id=label, token_ids=pb.TokenIds(ids=resp.prompt_token_ids),
                                           params=request.params),
                first_token_id=resp.first.token_ids[0], kv=resp.kv,
            )
            stream = decode.stub.Decode(dreq)
            context.add_callback(stream.cancel)  # a client cancel aborts the decode (its pages are freed)
            try:
                for i, item in enumerate(stream):
                    if i == 0 and metrics is not None:
                        metrics.handoff.observe(time.monotonic() - first_at)
                    yield item
            except grpc.RpcError as e:
                self._fail(e, decode, context)
        finally:
            self._pool.release(decode)

    def _backend(self, role: str, context: grpc.ServicerContext) -> Backend:
        try:
            return self._pool.pick(role)
        except NoBackend as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    def _result(self, call: grpc.Future, backend: Backend, context: grpc.ServicerContext) -> dpb.PrefillResponse:
        try:
            return call.result()
        except grpc.RpcError as e:
            self._fail(e, backend, context)
        except grpc.FutureCancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled by the client")

    def _fail(self, e: grpc.RpcError, backend: Backend, context: grpc.ServicerContext) -> None:
        code = e.code()
        if code in _PASSED_THROUGH:
            context.abort(code, e.details())
        if code == grpc.StatusCode.CANCELLED and not context.is_active():
            context.abort(code, "cancelled by the client")
        if code == grpc.StatusCode.UNAVAILABLE:
            threading.Thread(target=self._pool.probe, args=(backend,), daemon=True).start()
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{backend.role} server {backend.target}: {e.details()}")

    # -- model-level calls: answered by the least-loaded prefill server ----------------------
    def _forward(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        backend = self._backend("prefill", context)
        try:
            call = getattr(backend.infer, method).future(request, timeout=context.time_remaining())
            context.add_callback(call.cancel)
            return self._result(call, backend, context)
        finally:
            self._pool.release(backend)

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        return self._forward("Embed", request, context)

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        return self._forward("Tokenize", request, context)

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        return self._forward("ModelInfo", request, context)


class Router:
    """The router's gRPC server, health and probe thread."""

    def __init__(self, pool: BackendPool, *, host: str = "127.0.0.1", port: int = 0,
                 probe_interval_s: float = 1.0, max_workers: int = 64, api_key: str | None = None,
                 tls: Any = None, metrics: RouterMetrics | None = None) -> None:
        """``tls``: ``auth.TlsFiles`` for the public port; then ``loopback_port`` is a second,
        plaintext port on 127.0.0.1 (same key check) for this router's own HTTP front end."""
        from concurrent import futures

        from grpc_health.v1 import health_pb2_grpc

        from serving.auth import SyncApiKeyInterceptor

        self.pool, self.probe_interval_s = pool, probe_interval_s
        interceptors = [SyncApiKeyInterceptor(api_key)] if api_key else []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors)
        pb_grpc.add_InferenceServicer_to_server(RouterServicer(pool, metrics), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{host}:{port}"
        if tls is not None:
            self.port = self.server.add_secure_port(address, tls.server_credentials())
            self.loopback_port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.loopback_port = self.server.add_insecure_port(address)
        if self.port == 0 or self.loopback_port == 0:
            raise OSError(f"cannot bind {address}")
        self._stop = threading.Event()
        pool.on_change = self._set_health
        self._prober = threading.Thread(target=self._probe_loop, name="energon-router-probe", daemon=True)

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", "energon.v1.Inference"):
            self.health.set(name, status)

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.probe_interval_s):
            self.pool.probe_all()

    def start(self) -> None:
        self.pool.probe_all()
        self._set_health(self.pool.serving())
        self.server.start()
        self._prober.start()

    def stop(self, grace_s: float = 2.0) -> None:
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=grace_s).wait()
        self.pool.close()
