"""``energon router``: one public gRPC endpoint over separate prefill and decode servers (``serving/router.py``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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
    parser.add_argument("--port-file", type=Path, help="write the bound port as JSON here once listening")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def run(args: argparse.Namespace) -> int:
    from serving.router import BackendPool, Router, parse_targets

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("energon.serving.router")
    try:
        if args.http_port is not None and not 0 <= args.http_port <= 65535:
            raise ValueError(f"--http-port={args.http_port} must be in [0, 65535]")
        if args.served_model_name == "":
            raise ValueError("--served-model-name must not be empty when given")
        if args.probe_interval <= 0:
            raise ValueError(f"--probe-interval={args.probe_interval} must be > 0")
        pool = BackendPool(parse_targets(args.prefill, "--prefill"), parse_targets(args.decode, "--decode"))
        router = Router(pool, host=args.host, port=args.port, probe_interval_s=args.probe_interval)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    router.start()
    log.info("router on %s:%d; prefill %s; decode %s", args.host, router.port, args.prefill, args.decode)
    if args.http_port is not None:  # the port file waits for the HTTP port
        code = asyncio.run(_serve_http(args, router.port))
        router.stop()
        return code
    _write_ports(args.port_file, {"port": router.port})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # a bare wait() may not wake for the signal handler
        pass
    router.stop()
    return 0


def _write_ports(port_file: Path | None, ports: dict[str, int]) -> None:
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ports))
        tmp.rename(port_file)


async def _serve_http(args: argparse.Namespace, grpc_port: int) -> int:
    """The OpenAI HTTP API (``serving/router_http.py``) in this thread's event loop, until SIGTERM/SIGINT."""
    from serving.router_http import RouterHttpConfig, serve_http

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # a wildcard: loopback reaches it
    config = RouterHttpConfig(grpc_target=f"{local}:{grpc_port}", host=args.host, port=args.http_port,
                              model=args.model, served_model_name=args.served_model_name,
                              chat_template=args.chat_template)
    return await serve_http(config, stop, lambda port: _write_ports(args.port_file, {"port": grpc_port,
                                                                                     "http_port": port}))
