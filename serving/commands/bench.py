"""``energon bench serving``: a seeded synthetic workload against a running server.

Sends ``--num-requests`` requests (long-tailed prompt and output lengths drawn
from ``--seed``) at ``--rate`` requests/s with Poisson arrivals, or all at once
with ``--burst``, and prints TTFT, TPOT, inter-token and end-to-end latency at
p50/p90/p99, throughput, and goodput under ``--ttft-slo-ms`` and
``--tpot-slo-ms`` (the share of requests meeting both, as DistServe defines it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

NAME = "bench"
HELP = "benchmark a running server: energon bench serving --target HOST:PORT (TTFT, TPOT, goodput)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=("serving",), help="what to benchmark (serving: a running gRPC server)")
    parser.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="requests per second, Poisson arrivals")
    load.add_argument("--burst", action="store_true", help="send every request at once (the default without --rate)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(8, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(8, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=100.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of each request in seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    parser.add_argument("--api-key", default=None, help="API key (default: $ENERGON_API_KEY)")
    parser.add_argument("--tls-ca", type=Path)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--server-name", default=None)


async def bench(args: argparse.Namespace):
    from serving.client import InferenceClient
    from serving.commands.client import client_config
    from serving.loadgen import run_open_loop, summarize, synthetic_workload

    async with InferenceClient(client_config(args)) as client:
        info = await client.model_info(timeout=60)
        lo, hi = args.prompt_len
        out_lo, out_hi = args.output_len
        # Keep every request within the model's length: nothing gets rejected for size.
        hi = min(hi, info.max_model_len - out_hi)
        if hi < lo:
            raise ValueError(
                f"prompt_len={args.prompt_len} with output_len max {out_hi} "
                f"does not fit max_model_len={info.max_model_len}"
            )
        items = synthetic_workload(
            args.num_requests, seed=args.seed, vocab_size=info.vocab_size, prompt_len=(lo, hi),
            output_len=(out_lo, out_hi), rate=args.rate, temperature=args.temperature,
        )  # fmt: skip
        records = await run_open_loop(client, items, timeout_s=args.timeout)
    return summarize(records, ttft_slo_s=args.ttft_slo_ms / 1000, tpot_slo_s=args.tpot_slo_ms / 1000), records


def run(args: argparse.Namespace) -> int:
    from serving.loadgen import format_summary

    try:
        summary, records = asyncio.run(bench(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load = f"{args.rate} req/s Poisson" if args.rate else "burst"
    title = f"energon bench serving: {args.target}, {args.num_requests} requests, {load}, seed {args.seed}"
    print(format_summary(summary, title))
    errors = sorted({f"{r.error}: {r.error_details}" for r in records if r.error})
    for e in errors[:10]:
        print(f"error: {e}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(summary), indent=2))
    return 0 if summary.errors == 0 else 1
