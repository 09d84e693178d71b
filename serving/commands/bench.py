"""``energon bench serving``: a seeded synthetic workload against a running server.

Sends ``--num-requests`` requests (long-tailed prompt and output lengths drawn
from ``--seed``) at ``--rate`` requests/s with Poisson arrivals, or all at once
with ``--burst``, and prints TTFT, TPOT, inter-token and end-to-end latency at
p50/p90/p99, throughput, and goodput under ``--ttft-slo-ms`` and
``--tpot-slo-ms`` (the share of requests meeting both, as DistServe defines it).

``--backend grpc`` (the default for a ``HOST:PORT`` target) drives the ``energon.v1``
Generate stream; ``--backend openai`` (the default for an ``http://`` target) drives
streamed ``/v1/completions`` on any OpenAI-compatible server. Every request carries a
fresh id; aborted, empty or short answers count as errors (``serving/loadgen.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

NAME = "bench"
HELP = "benchmark a running server: energon bench serving --target HOST:PORT or http://HOST:PORT (TTFT, TPOT, goodput)"
# Token ids every tokenizer with a byte-level or byte-fallback vocabulary has; the OpenAI API
# does not say a model's vocabulary size, so an HTTP run draws from these unless told more.
OPENAI_DEFAULT_VOCAB = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=("serving",), help="what to benchmark (serving: a running server)")
    parser.add_argument("--target", default="127.0.0.1:50051",
                        help="gRPC HOST:PORT, or the HTTP API's base URL http://HOST:PORT")  # fmt: skip
    parser.add_argument("--backend", choices=("grpc", "openai"), default=None,
                        help="protocol (default: openai for an http(s):// target, else grpc)")  # fmt: skip
    parser.add_argument("--model", default=None, help="model id for --backend openai (default: the first listed)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"prompt token ids are drawn below this (default: the server's vocabulary over "
                        f"gRPC, {OPENAI_DEFAULT_VOCAB} over HTTP)")  # fmt: skip
    parser.add_argument("--num-requests", type=int, default=200, help="requests in the workload")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="requests per second, Poisson arrivals")
    load.add_argument("--burst", action="store_true", help="send every request at once (the default without --rate)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(8, 256), metavar=("MIN", "MAX"),
                        help="prompt tokens, log-uniform")  # fmt: skip
    parser.add_argument("--output-len", type=int, nargs=2, default=(8, 128), metavar=("MIN", "MAX"),
                        help="output tokens (max_tokens with ignore_eos), log-uniform")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of every request")
    parser.add_argument("--ttft-slo-ms", type=float, default=1000.0, help="TTFT objective for goodput")
    parser.add_argument("--tpot-slo-ms", type=float, default=100.0, help="TPOT objective for goodput")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of each request in seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    parser.add_argument("--api-key", default=None, help="API key (default: $ENERGON_API_KEY)")
    parser.add_argument("--tls-ca", type=Path, help="CA that signed the server's certificate (enables TLS)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate, for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client private key, for mutual TLS")
    parser.add_argument("--server-name", default=None, help="name to check the gRPC server's certificate against")


def backend_name(args: argparse.Namespace) -> str:
    if args.backend is not None:
        return args.backend
    return "openai" if args.target.startswith(("http://", "https://")) else "grpc"


def workload(args: argparse.Namespace, *, vocab_size: int, max_model_len: int | None):
    """The seeded workload, every request within ``max_model_len`` (nothing rejected for size)."""
    from serving.loadgen import synthetic_workload

    lo, hi = args.prompt_len
    out_lo, out_hi = args.output_len
    if max_model_len is not None:
        hi = min(hi, max_model_len - out_hi)
        if hi < lo:
            raise ValueError(
                f"prompt_len={args.prompt_len} with output_len max {out_hi} does not fit {max_model_len=}"
            )
    return synthetic_workload(
        args.num_requests, seed=args.seed, vocab_size=vocab_size, prompt_len=(lo, hi),
        output_len=(out_lo, out_hi), rate=args.rate, temperature=args.temperature,
    )  # fmt: skip


async def _records_grpc(args: argparse.Namespace):
    from serving.client import InferenceClient
    from serving.commands.client import client_config
    from serving.loadgen import GrpcBackend, run_open_loop

    async with InferenceClient(client_config(args)) as client:
        info = await client.model_info(timeout=60)
        items = workload(args, vocab_size=args.vocab_size or info.vocab_size, max_model_len=info.max_model_len)
        return await run_open_loop(GrpcBackend(client), items, timeout_s=args.timeout)


async def _records_openai(args: argparse.Namespace):
    import os

    from serving.auth import API_KEY_ENV
    from serving.loadgen import run_open_loop
    from serving.loadgen_http import HttpTarget, open_backend

    target = HttpTarget(
        args.target, model=args.model, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
    )  # fmt: skip
    async with open_backend(target) as (backend, card):
        vocab = args.vocab_size or OPENAI_DEFAULT_VOCAB
        items = workload(args, vocab_size=vocab, max_model_len=card.get("max_model_len"))
        return await run_open_loop(backend, items, timeout_s=args.timeout)


async def bench(args: argparse.Namespace):
    from serving.loadgen import summarize

    if args.backend == "openai" and not args.target.startswith(("http://", "https://")):
        raise ValueError(f"--backend openai needs an http(s):// target, not target={args.target!r}")
    run = _records_openai if backend_name(args) == "openai" else _records_grpc
    records = await run(args)
    return summarize(records, ttft_slo_s=args.ttft_slo_ms / 1000, tpot_slo_s=args.tpot_slo_ms / 1000), records


def run(args: argparse.Namespace) -> int:
    from serving.loadgen import format_summary

    try:
        summary, records = asyncio.run(bench(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load = f"{args.rate} req/s Poisson" if args.rate else "burst"
    title = (
        f"energon bench serving: {args.target} ({backend_name(args)}), {args.num_requests} requests, {load}, "
        f"seed {args.seed}"
    )
    print(format_summary(summary, title))
    errors = sorted({f"{r.error}: {r.error_details}" for r in records if r.error})
    for e in errors[:10]:
        print(f"error: {e}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(summary), indent=2))
    return 0 if summary.errors == 0 else 1
