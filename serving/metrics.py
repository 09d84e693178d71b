"""Prometheus metrics of one server, on their own registry and HTTP port.

Request-path metrics (latencies, token counters, finish reasons) are recorded
by the servicer as responses go out. Engine state (queued and running requests,
KV pages) is read from ``engine.stats`` at scrape time by a collector, so a
scrape always sees the engine as it is now, with no polling thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Latency buckets from 1 ms to 60 s: a CPU test model and a GPU service both fit.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineStatsCollector(Collector):
    def __init__(self, stats: Callable[[], Any | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        if s is None:  # the engine is not loaded yet
            return
        yield GaugeMetricFamily("energon_requests_queued", "Requests waiting for admission", value=s.queued)
        yield GaugeMetricFamily("energon_requests_running", "Requests in the running batch", value=s.running)
        yield GaugeMetricFamily("energon_kv_pages_used", "KV cache pages held by requests", value=s.pages_used)
        yield GaugeMetricFamily("energon_kv_pages_total", "KV cache pages in the pool", value=s.pages_total)
        usage = s.pages_used / s.pages_total if s.pages_total else 0.0
        yield GaugeMetricFamily("energon_kv_cache_usage_ratio", "Share of KV pages in use", value=usage)
        # Cumulative engine counters, exposed as counters (the engine owns them; a scrape reads them).
        yield CounterMetricFamily(
            "energon_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
            value=getattr(s, "prefix_cache_queries", 0),
        )
        yield CounterMetricFamily(
            "energon_prefix_cache_hits", "Prompt tokens whose KV pages came from the prefix cache",
            value=getattr(s, "prefix_cache_hits", 0),
        )


class ServingMetrics:
    def __init__(self, engine_stats: Callable[[], Any | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        b = LATENCY_BUCKETS
        self.ttft = Histogram(
            "energon_time_to_first_token_seconds", "Time from request arrival to its first token", buckets=b, registry=r
        )
        self.inter_token = Histogram(
            "energon_inter_token_latency_seconds", "Time between consecutive streamed tokens", buckets=b, registry=r
        )
        self.e2e = Histogram(
            "energon_e2e_request_latency_seconds", "Time from request arrival to its last token", buckets=b, registry=r
        )
        self.prompt_tokens = Counter("energon_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("energon_generation_tokens", "Tokens streamed to clients", registry=r)
        self.finished = Counter(
            "energon_requests_finished", "Requests that ended, by reason", ["reason"], registry=r
        )
        self.http_requests = Counter(
            "energon_http_requests", "OpenAI HTTP API requests, by method, route and status",
            ["method", "route", "status"], registry=r,
        )  # fmt: skip
        r.register(_EngineStatsCollector(engine_stats))


def engine_stats_collector(engine_stats: Callable[[], Any | None]) -> Collector:
    """Gauges and counters read from ``engine_stats()`` (an ``EngineStats``, or None) at scrape time."""
    return _EngineStatsCollector(engine_stats)


class MetricsHttpServer:
    """``/metrics`` over HTTP on ``host:port`` (port 0 picks a free one)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
