"""``energon router``: one public gRPC endpoint over separate prefill and decode servers (``serving/router.py``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import threading
from pathlib import Path

NAME = "router"
HELP = "route requests to prefill servers, then decode servers (energon serve --role prefill|decode)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", required=True, help="prefill servers: HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--decode", required=True, help="decode servers: HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0: a free port)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="OpenAI-compatible HTTP API port (0: a free port; default: none, gRPC only)")
    parser.add_argument("--model", default=None,
                        help="with --http-port: the checkpoint directory the servers load, for the tokenizer and "
                             "chat template (default: the path the prefill server reports)")
    parser.add_argument("--chat-template", type=Path, default=None,
                        help="with --http-port: a Jinja chat template file (overrides the checkpoint's)")
    parser.add_argument("--served-model-name", default=None,
                        help="with --http-port: the model name of the OpenAI API (default: the checkpoint path)")
    parser.add_argument("--probe-interval", type=float, default=1.0, help="seconds between backend health probes")
    parser.add_argument("--api-key", default=None,
                        help="require 'authorization: Bearer KEY' from clients on gRPC and HTTP, health excepted "
                             "(default: $ENERGON_API_KEY; prefer the variable: ps shows command lines)")
    parser.add_argument("--backend-api-key", default=None,
                        help="the key the prefill and decode servers require (default: $ENERGON_BACKEND_API_KEY, "
                             "else the router's own key)")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for clients; enables TLS")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", type=Path, help="CA for client certificates; enables mutual TLS")
    parser.add_argument("--backend-tls-ca", type=Path, default=None,
                        help="talk TLS to the prefill and decode servers, trusting this CA (default: plaintext)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus /metrics port (0: a free port; default: no metrics endpoint)")
    parser.add_argument("--port-file", type=Path, help="write the bound port as JSON here once listening")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def run(args: argparse.Namespace) -> int:
    from serving.auth import API_KEY_ENV, tls_from_flags
    from serving.router import BackendPool, Router, RouterMetrics, parse_targets

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("energon.serving.router")
    try:
        if args.http_port is not None and not 0 <= args.http_port <= 65535:
            raise ValueError(f"--http-port={args.http_port} must be in [0, 65535]")
        if args.served_model_name == "":
            raise ValueError("--served-model-name must not be empty when given")
        if args.probe_interval <= 0:
            raise ValueError(f"--probe-interval={args.probe_interval} must be > 0")
        if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
            raise ValueError(f"--metrics-port={args.metrics_port} must be in [0, 65535]")
        for flag in ("api_key", "backend_api_key"):
            if getattr(args, flag) == "":
                raise ValueError(f"--{flag.replace('_', '-')} must not be empty when given")
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        backend_key = args.backend_api_key or os.environ.get(BACKEND_API_KEY_ENV) or api_key
        tls = tls_from_flags(args.tls_cert, args.tls_key, args.tls_client_ca)
        if tls is not None:
            tls.server_credentials()  # a missing file: an error now, naming it
        pool = BackendPool(parse_targets(args.prefill, "--prefill"), parse_targets(args.decode, "--decode"),
                           api_key=backend_key, tls_ca=args.backend_tls_ca)
        metrics = None if args.metrics_port is None else RouterMetrics(pool)
        router = Router(pool, host=args.host, port=args.port, probe_interval_s=args.probe_interval,
                        api_key=api_key, tls=tls, metrics=metrics)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    from serving.metrics import MetricsHttpServer

    metrics_http = None if metrics is None else MetricsHttpServer(metrics.registry, args.host, args.metrics_port)
    router.start()
    log.info("router on %s:%d (%s%s); prefill %s; decode %s", args.host, router.port, "TLS" if tls else "plaintext",
             ", API key" if api_key else "", args.prefill, args.decode)
    ports = {"port": router.port} if metrics_http is None else {"port": router.port, "metrics_port": metrics_http.port}
    try:
        if args.http_port is not None:  # the port file waits for the HTTP port
            return asyncio.run(_serve_http(args, router, ports, api_key, tls))
        _write_ports(args.port_file, ports)
        _wait_for_signal()
        return 0
    finally:
        router.stop()
        if metrics_http is not None:
            metrics_http.close()


BACKEND_API_KEY_ENV = "ENERGON_BACKEND_API_KEY"


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # a bare wait() may not wake for the signal handler
        pass


def _write_ports(port_file: Path | None, ports: dict[str, int]) -> None:
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ports))
        tmp.rename(port_file)


async def _serve_http(args: argparse.Namespace, router, ports: dict[str, int], api_key: str | None, tls) -> int:
    """The OpenAI HTTP API (``serving/router_http.py``) in this thread's event loop, until SIGTERM/SIGINT."""
    from serving.router_http import RouterHttpConfig, serve_http

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A wildcard or TLS: the plaintext loopback port (Router.loopback_port) reaches the router.
    local = "127.0.0.1" if tls is not None or args.host in ("0.0.0.0", "::", "") else args.host
    config = RouterHttpConfig(grpc_target=f"{local}:{router.loopback_port}", host=args.host, port=args.http_port,
                              model=args.model, served_model_name=args.served_model_name,
                              chat_template=args.chat_template, api_key=api_key, tls=tls)
    return await serve_http(config, stop, lambda port: _write_ports(args.port_file, {**ports, "http_port": port}))
