"""``energon router``: one public gRPC endpoint over separate prefill and decode servers (``serving/router.py``)."""

from __future__ import annotations

import argparse
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
                        help="OpenAI-compatible HTTP API port: not served by the router yet (an error if given)")
    parser.add_argument("--probe-interval", type=float, default=1.0, help="seconds between backend health probes")
    parser.add_argument("--port-file", type=Path, help="write the bound port as JSON here once listening")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def run(args: argparse.Namespace) -> int:
    from serving.router import BackendPool, Router, parse_targets

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("energon.serving.router")
    try:
        if args.http_port is not None:
            raise ValueError(f"--http-port={args.http_port}: the router serves gRPC only for now")
        if args.probe_interval <= 0:
            raise ValueError(f"--probe-interval={args.probe_interval} must be > 0")
        pool = BackendPool(parse_targets(args.prefill, "--prefill"), parse_targets(args.decode, "--decode"))
        router = Router(pool, host=args.host, port=args.port, probe_interval_s=args.probe_interval)
    except (ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    router.start()
    log.info("router on %s:%d; prefill %s; decode %s", args.host, router.port, args.prefill, args.decode)
    if args.port_file is not None:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": router.port}))
        tmp.rename(args.port_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # a bare wait() may not wake for the signal handler
        pass
    router.stop()
    return 0
