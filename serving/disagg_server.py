"""``energon serve --role prefill|decode``: the internal ``energon.v1.Disagg`` service over a ``RoleWorker``.

Beside it, the model-level calls of ``energon.v1.Inference`` (``Tokenize``, ``ModelInfo``,
``Embed``), which the router forwards to its least-loaded prefill server.

A plain threaded gRPC server (each call blocks its own handler thread on the worker's result
queue). Status codes: ``ValueError`` (sampling params, prompt too long) -> INVALID_ARGUMENT;
an engine that failed -> INTERNAL (the process then exits non-zero); a pull that failed
(the prefill server died or dropped the K/V) -> UNAVAILABLE. gRPC health says SERVING once
the engine is built and warmed up, NOT_SERVING while shutting down.

Security and metrics as ``energon serve``'s: ``--api-key`` (or ``$ENERGON_API_KEY``) guards
every method but health, ``--tls-cert/--tls-key[/--tls-client-ca]`` put TLS (mutual) on the
gRPC port, and ``--metrics-port`` serves Prometheus ``/metrics``: the engine's queue and pages
and, on a decode server, its K/V pulls. The K/V themselves travel over
``jax.experimental.transfer``'s own connections, which neither the key nor TLS cover: keep
prefill and decode servers on a private network.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import uuid
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving.convert import embeddings_to_proto, info_to_proto, params_from_proto, response_from_delta
from serving.disagg_role import Aborted, KvOffer, RoleWorker, iterate
from serving.protos.energon.v1 import disagg_pb2 as dpb
from serving.protos.energon.v1 import disagg_pb2_grpc as dpb_grpc
from serving.protos.energon.v1 import inference_pb2 as pb
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("energon.serving.disagg")


class DisaggServicer(dpb_grpc.DisaggServicer):
    def __init__(self, worker: RoleWorker) -> None:
        self._w = worker

    def _params(self, request: pb.GenerateRequest) -> Any:
        from energon_jax.request import SamplingParams

        return params_from_proto(request.params, SamplingParams)

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "token_ids":
            return list(request.token_ids.ids)
        if which == "text":
            tok = self._w.engine.tokenizer
            if tok is None:
                raise ValueError("prompt text needs a tokenizer (tokenizer.json), and this model has none")
            return list(tok.encode(request.text))
        raise ValueError("prompt must be set: give text or token_ids")

    def Prefill(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> dpb.PrefillResponse:
        if self._w.role != "prefill":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this server's role is {self._w.role}, not prefill")
        rid = uuid.uuid4().hex
        try:
            ids = self._prompt_ids(request)
            salt = request.cache_salt if request.HasField("cache_salt") else None
            out = self._w.prefill(rid, ids, self._params(request), cache_salt=salt)
            if not context.add_callback(lambda: self._w.abort(rid)):  # a cancelled call frees its pages
                self._w.abort(rid)
            delta, offer = next(iterate(out))
        except Aborted:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled by the client")
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:
            context.abort(grpc.StatusCode.INTERNAL, str(e))
        resp = dpb.PrefillResponse(first=response_from_delta(request.request_id, delta), prompt_token_ids=ids)
        if offer is not None:
            resp.kv.CopyFrom(dpb.KvDescriptor(
                uuid=offer.uuid, transfer_address=offer.transfer_address, num_pages=offer.num_pages,
                bucket_pages=offer.bucket_pages, num_computed_tokens=offer.num_computed_tokens,
                null_slots=offer.null_slots, cached_tokens=offer.cached_tokens,
            ))
        return resp

    def Decode(self, request: dpb.DecodeRequest, context: grpc.ServicerContext):
        if self._w.role != "decode":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this server's role is {self._w.role}, not decode")
        rid = uuid.uuid4().hex
        kv = request.kv
        offer = KvOffer(kv.uuid, kv.transfer_address, kv.num_pages, kv.bucket_pages, kv.num_computed_tokens,
                        tuple(kv.null_slots), kv.cached_tokens)
        label = request.request.request_id
        failure = None
        cancelled = threading.Event()

        def on_end() -> None:  # a call that ends early (client cancel) aborts the request, pulled or not
            cancelled.set()
            self._w.abort(rid)

        if not context.add_callback(on_end):  # the call already ended
            return
        try:
            out = self._w.decode(rid, list(request.request.token_ids.ids), self._params(request.request),
                                 request.first_token_id, offer, cancelled)
            for delta in iterate(out):
                yield response_from_delta(label, delta)
                if delta.finished:
                    break
        except Aborted:  # the call has ended: nobody reads a status
            return
        except ValueError as e:
            failure = (grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:  # the engine failed here
            failure = (grpc.StatusCode.INTERNAL, str(e))
        except Exception as e:  # the pull: the prefill server is gone or dropped the K/V
            failure = (grpc.StatusCode.UNAVAILABLE, f"pulling the prefilled K/V failed: {e}")
        if failure is not None:
            context.abort(*failure)

    def Stats(self, request: dpb.StatsRequest, context: grpc.ServicerContext) -> dpb.StatsResponse:
        used, total = self._w.pages()
        st = self._w.pull_stats
        return dpb.StatsResponse(in_flight=self._w.in_flight(), pages_used=used, pages_total=total,
                                 pulls=st.pulls, pull_seconds=st.seconds, pull_bytes=st.bytes)


class RoleInferenceServicer(pb_grpc.InferenceServicer):
    """The model-level calls of ``energon.v1.Inference`` (``Tokenize``, ``ModelInfo``, ``Embed``),
    which the router forwards to a prefill server. ``Generate`` goes through the router."""

    def __init__(self, worker: RoleWorker) -> None:
        self._w = worker
        self._embed_lock = threading.Lock()  # as AsyncEngine.embed: one embedding batch at a time

    def Generate(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"this is a {self._w.role} server: send Generate to energon router")

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        tok = self._w.engine.tokenizer
        if tok is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer (tokenizer.json)")
        return pb.TokenizeResponse(token_ids=tok.encode(request.text) if request.text else [])

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        from energon_jax.async_engine import model_info

        return info_to_proto(model_info(self._w.engine))

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        if not request.texts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "texts must not be empty")
        try:
            with self._embed_lock:  # the encoder path: no scheduler, no pages, not the engine thread's step
                vectors = self._w.engine.embed(list(request.texts), normalize=request.normalize)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return embeddings_to_proto(vectors.tolist())


class _RoleCollector:
    """Scrape-time gauges of a role worker: requests held and K/V pulled."""

    def __init__(self, worker: RoleWorker) -> None:
        self._w = worker

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self._w.pull_stats
        yield GaugeMetricFamily("energon_role_requests_in_flight", "Requests this role server holds",
                                value=self._w.in_flight())
        yield CounterMetricFamily("energon_kv_pulls", "K/V transfers this server pulled", value=st.pulls)
        yield CounterMetricFamily("energon_kv_pull_bytes", "Bytes those pulls moved", value=st.bytes)
        yield CounterMetricFamily("energon_kv_pull_seconds", "Wall time spent pulling", value=st.seconds)


def _engine_stats(engine: Any) -> Any:
    """The scheduler's counts, read from the scrape thread (plain ints: at worst one step stale)."""
    from energon_jax.async_engine import EngineStats

    s = engine.scheduler
    return EngineStats(s.num_waiting, s.num_running, s.pages_used, s.pages_total,
                       getattr(s, "prefix_cache_queries", 0), getattr(s, "prefix_cache_hits", 0))


def _role_metrics(worker: RoleWorker, host: str, port: int) -> Any:
    from prometheus_client import CollectorRegistry

    from serving.metrics import MetricsHttpServer, engine_stats_collector

    registry = CollectorRegistry()
    registry.register(engine_stats_collector(lambda: _engine_stats(worker.engine)))
    registry.register(_RoleCollector(worker))
    return MetricsHttpServer(registry, host, port)


def serve_role(role: str, model: str | None, engine_kwargs: dict[str, Any], *, host: str, port: int,
               port_file: Path | None = None, max_workers: int = 64, api_key: str | None = None,
               tls: Any = None, metrics_port: int | None = None) -> int:
    """Build the engine, start the transfer and gRPC servers, serve until SIGTERM/SIGINT.
    ``tls``: ``auth.TlsFiles``; ``metrics_port`` None: no metrics endpoint."""
    from energon_jax.engine import Engine
    from serving.auth import SyncApiKeyInterceptor

    kwargs = dict(engine_kwargs, async_scheduling=False)
    if role == "decode":  # adopted requests arrive prefilled; Scheduler.attach takes no prefix cache
        kwargs["enable_prefix_caching"] = False
    engine = Engine.from_pretrained(model, **kwargs)
    worker = RoleWorker(engine, role, host=host)
    interceptors = [SyncApiKeyInterceptor(api_key)] if api_key else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors)
    dpb_grpc.add_DisaggServicer_to_server(DisaggServicer(worker), server)
    pb_grpc.add_InferenceServicer_to_server(RoleInferenceServicer(worker), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    metrics = None if metrics_port is None else _role_metrics(worker, host, metrics_port)
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("%s server on %s:%d (%s%s), transfer server on %s", role, host, bound, "TLS" if tls else "plaintext",
             ", API key" if api_key else "", worker.address)
    if port_file is not None:
        ports = {"port": bound, "transfer": worker.address, "role": role}
        if metrics is not None:
            ports["metrics_port"] = metrics.port
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ports))
        tmp.rename(port_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if worker.failure is not None:
            break
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=2).wait()
    if metrics is not None:
        metrics.close()
    worker.shutdown()
    return 1 if worker.failure is not None else 0
