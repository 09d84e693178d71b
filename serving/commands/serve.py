"""``energon serve``: run the gRPC server and the OpenAI-compatible HTTP API over one AsyncEngine.

Under ``energon launch -n N`` (or the ``--coordinator-address/--num-processes/--process-id``
flags) every process joins one ``jax.distributed`` run before any device is used and builds
the same engine (``--tp/--dp``); process 0 binds the gRPC port and serves the API, the
others run the steps it broadcasts until it shuts down (``AsyncEngine.shutdown``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

NAME = "serve"
HELP = "run the inference server: gRPC and the OpenAI-compatible HTTP API (health, Prometheus metrics)"

# Engine flags passed to AsyncEngine.from_pretrained only when given, so the
# engine's own defaults hold otherwise.
_ENGINE_FLAGS = (
    ("dtype", str, "parameter dtype, e.g. float32 or bfloat16"),
    ("max_model_len", int, "longest prompt + completion in tokens"),
    ("page_size", int, "tokens per KV page"),
    ("kv_cache_pages", int, "KV pages in the pool (default on accelerators: sized from device memory)"),
    ("kv_cache_memory_fraction", float, "share of each device's memory the weights, a step and the KV pool may "
     "use when the pool is sized from memory (engine default 0.9)"),
    ("max_num_seqs", int, "most requests in the running batch"),
    ("max_num_batched_tokens", int, "token budget of one step"),
    ("max_queue", int, "most requests waiting for admission (more get RESOURCE_EXHAUSTED)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint path (default: the embedded demo model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0: a free port)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus /metrics port (0: a free port; default 9090, none for --role prefill|decode)")
    parser.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'authorization: Bearer KEY' on every method but health (default: $ENERGON_API_KEY; "
        "prefer the variable: a key on the command line is visible to other users in ps)",
    )
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables TLS")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", type=Path, help="CA for client certificates; enables mutual TLS")
    parser.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024, help="largest request accepted")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    parser.add_argument(
        "--no-warmup", action="store_true",
        help="skip warm-up: no step shape compiled at start and no warm-up request (first requests compile)",
    )  # fmt: skip
    parser.add_argument(
        "--role", choices=("colocated", "prefill", "decode"), default="colocated",
        help="prefill or decode: one half of a disaggregated deployment behind `energon router` "
        "(internal service, K/V pages pulled server to server; default colocated: the public API)",
    )
    parser.add_argument("--port-file", type=Path, help="write the bound ports as JSON here once listening")
    add_http_arguments(parser)
    from energon_jax import compile_cache

    compile_cache.add_arguments(parser)  # --compile-cache DIR, --no-compile-cache
    from energon_jax.commands.generate import add_parallel_arguments
    from energon_jax.parallel.distributed import add_distributed_arguments

    add_parallel_arguments(parser)  # --tp --pp --dp --offload --resident-layers
    add_distributed_arguments(parser)
    for name, typ, help_text in _ENGINE_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None, help=help_text)
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra keyword argument for the engine (value parsed as JSON, else taken as a string)",
    )
    parser.add_argument(
        "--engine-factory",
        default="serving.binding:energon_binding",
        help="module:function that builds the engine binding (tests use mock_engine:serve_binding)",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """The OpenAI HTTP API and the admission limits both front ends share."""
    from serving.admission import AdmissionLimits

    parser.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP API port (0: a free port)")
    parser.add_argument("--no-http", action="store_true", help="serve no HTTP API (gRPC only)")
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the model id of the HTTP API (default: --model as given; the demo model is 'energon-demo')",
    )
    parser.add_argument(
        "--chat-template", type=Path, default=None, help="Jinja2 chat template file (overrides the checkpoint's)"
    )
    defaults = AdmissionLimits()
    for name, help_text in (
        ("max_stop_strings", "most stop strings in one request"),
        ("max_stop_string_len", "longest stop string, in characters"),
        ("max_n", "most choices per prompt (OpenAI n)"),
        ("max_prompts", "most prompts in one completions request"),
        ("max_prompt_chars", "longest prompt (or chat messages together), in characters"),
        ("max_embed_texts", "most texts in one Embed / embeddings call"),
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=int, default=getattr(defaults, name),
            help=help_text,
        )  # fmt: skip


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from energon_jax.commands.generate import parallel_kwargs

    kwargs: dict[str, Any] = {
        name: getattr(args, name) for name, _, _ in _ENGINE_FLAGS if getattr(args, name) is not None
    }
    kwargs.update(parallel_kwargs(args))
    if args.no_warmup:  # the engine compiles every bucket shape at construction unless told not to
        kwargs["warmup"] = False
    for item in args.engine_arg:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg {item!r} must look like KEY=VALUE")
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw
    return kwargs


def server_config(args: argparse.Namespace):
    from serving.admission import AdmissionLimits
    from serving.auth import API_KEY_ENV, tls_from_flags
    from serving.server import ServerConfig

    tls = tls_from_flags(args.tls_cert, args.tls_key, args.tls_client_ca)
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=None if args.no_metrics else (9090 if args.metrics_port is None else args.metrics_port),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        tls=tls,
        max_receive_bytes=args.max_message_bytes,
        grace_s=args.grace,
        warmup=not args.no_warmup,
        port_file=args.port_file,
        http_port=None if args.no_http else args.http_port,
        served_model_name=args.served_model_name,
        chat_template=args.chat_template,
        limits=AdmissionLimits(**{name: getattr(args, name) for name in AdmissionLimits.__dataclass_fields__}),
    )


def run(args: argparse.Namespace) -> int:
    from energon_jax.parallel import distributed
    from serving.binding import load_factory
    from serving.server import serve

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("energon.serving")
    from energon_jax import compile_cache

    try:
        cache = compile_cache.configure_from_args(args)  # before anything compiles
        log.info("XLA compilation cache: %s", cache or "off")
        config = server_config(args)
        factory = load_factory(args.engine_factory)
        kwargs = engine_kwargs(args)
        multi = distributed.initialize(distributed.config_from_args(args))  # before any device is used
    except ValueError as e:
        log.error("%s", e)
        return 2
    try:
        if args.role != "colocated":
            from serving.disagg_server import serve_role

            return serve_role(args.role, args.model, kwargs, host=args.host, port=args.port, port_file=args.port_file,
                              api_key=config.api_key, tls=config.tls,
                              metrics_port=None if args.no_metrics else args.metrics_port)
        if multi and not distributed.is_coordinator():
            return _serve_worker(factory, args.model, kwargs)
        return asyncio.run(serve(config, factory, args.model, kwargs))
    except (OSError, ValueError) as e:  # a port that cannot be bound, a TLS file that is missing
        log.error("%s", e)
        return 1
    finally:
        if multi:
            distributed.shutdown()


def _serve_worker(factory: Any, model: str | None, kwargs: dict[str, Any]) -> int:
    """Process i > 0: build the same engine as process 0, then run its steps; no port, no API."""
    import signal

    from energon_jax.parallel.controller import serve_if_worker

    # energon launch forwards SIGTERM/SIGINT to every process: a worker keeps running steps
    # until process 0 has drained and says stop (a dead process 0 ends it via the heartbeat).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    binding = factory(model, kwargs)
    runner = getattr(getattr(binding.engine, "engine", None), "runner", None)
    if not serve_if_worker(runner):
        raise ValueError(f"the engine factory's engine ({type(binding.engine).__name__}) cannot run multi-process")
    logging.getLogger("energon.serving").info("worker: process 0 shut down; exiting")
    return 0
