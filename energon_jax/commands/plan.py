"""``energon plan``: the best serving layout for a workload and SLOs (DistServe's planner).

Fits a step-time model from steps measured on the current backend (``planner.py``),
simulates every colocated and prefill/decode-disaggregated layout of ``--devices``
(``plan_sim.py``) on a Poisson workload (lengths from flags or a JSONL trace), and prints
each layout's TTFT/TPOT at ``--rate`` and its goodput per device, best first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "plan"
HELP = "pick the serving layout (colocated or prefill/decode disaggregated) with the best goodput per device"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Hugging Face checkpoint directory (default: embedded demo)")
    parser.add_argument("--rate", type=float, required=True, help="request rate to report latencies at (req/s)")
    parser.add_argument("--slo-ttft", type=float, required=True, help="TTFT objective in seconds")
    parser.add_argument("--slo-tpot", type=float, required=True, help="TPOT objective in seconds")
    parser.add_argument("--devices", type=int, default=1, help="devices to place the layout on")
    parser.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet both SLOs")
    w = parser.add_argument_group("workload (or --trace)")
    w.add_argument("--trace", default=None,
                   help="JSONL file, one request per line: {\"prompt_len\": N, \"output_len\": M}")
    w.add_argument("--prompt-len", type=float, default=128, help="mean prompt length in tokens")
    w.add_argument("--output-len", type=float, default=64, help="mean output length in tokens")
    w.add_argument("--len-dist", choices=("fixed", "exponential", "lognormal"), default="exponential",
                   help="distribution of both lengths")
    w.add_argument("--num-requests", type=int, default=400, help="simulated requests per point")
    w.add_argument("--seed", type=int, default=0)
    m = parser.add_argument_group("the engine measured, and assumptions")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    m.add_argument("--max-model-len", type=int, default=None, help="default: 1024 or the model's maximum, if lower")
    m.add_argument("--max-num-seqs", type=int, default=None, help="rows per step (engine default if not given)")
    m.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    m.add_argument("--tp-efficiency", type=float, default=0.9,
                   help="assumed speed-up per doubling of tp, relative to ideal (not measurable on one device)")
    m.add_argument("--transfer-s-per-token", type=float, default=0.0,
                   help="KV transfer time per prompt token between prefill and decode groups")
    m.add_argument("--quick", action="store_true", help="fewer calibration points (a rough fit, in seconds)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines instead of a table")


def read_trace(path: str, max_len: int):
    import numpy as np

    from energon_jax.plan_sim import Workload

    prompts, outputs = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            p, o = int(rec["prompt_len"]), int(rec["output_len"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--trace {path} line {n}: needs integer prompt_len and output_len ({e})") from e
        prompts.append(min(p, max_len - 1))
        outputs.append(max(1, min(o, max_len - min(p, max_len - 1))))
    if not prompts:
        raise ValueError(f"--trace {path} holds no requests")
    return Workload(np.zeros(len(prompts)), np.array(prompts), np.array(outputs))


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from energon_jax import Engine
    from energon_jax.plan_sim import (
        ReplicaLimits, Workload, goodput, layouts_for, layouts_table, sample_lengths, simulate, summarize,
    )
    from energon_jax.planner import calibrate, fit_error

    for name in ("rate", "slo_ttft", "slo_tpot"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    if not 0 < args.attainment <= 1:
        raise SystemExit(f"--attainment={args.attainment} must be in (0, 1]")
    kw = {k: getattr(args, k) for k in ("max_num_seqs", "max_num_batched_tokens") if getattr(args, k) is not None}
    from models.loading import load_config

    from energon_jax.engine import demo_model_path

    root = Path(args.model) if args.model else demo_model_path()
    max_len = args.max_model_len or min(1024, load_config(root).max_position_embeddings)
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, max_model_len=max_len, warmup=False, **kw)
    import jax

    print(f"measuring steps on {jax.default_backend()} ...", file=sys.stderr)
    cost, samples = calibrate(engine, quick=args.quick)
    print(f"step model: {cost.base_s * 1e3:.2f} ms + {cost.per_token_s * 1e6:.1f} us/token + "
          f"{cost.per_row_s * 1e6:.1f} us/row + {cost.per_attended_s * 1e9:.2f} ns/attended pair; "
          f"{cost.per_request_s * 1e3:.2f} ms per request "
          f"({len(samples)} steps, median error {fit_error(cost, samples):.0%})", file=sys.stderr)
    if args.trace:
        lengths = read_trace(args.trace, max_len)
    else:
        n = args.num_requests
        p = sample_lengths(n, args.prompt_len, dist=args.len_dist, maximum=max_len // 2, seed=args.seed)
        o = sample_lengths(n, args.output_len, dist=args.len_dist, maximum=max_len - max_len // 2, seed=args.seed + 1)
        lengths = Workload(np.zeros(n), p, o)
    limits = ReplicaLimits(int(engine.config.max_num_seqs), int(engine.config.max_num_batched_tokens))
    sim_kw = dict(tp_efficiency=args.tp_efficiency, transfer_s_per_token=args.transfer_s_per_token)
    rows = []
    for layout in layouts_for(args.devices):
        res = simulate(lengths.at_rate(args.rate, args.seed), layout, cost, limits, **sim_kw)
        best = goodput(lengths, layout, cost, limits, slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot,
                       attainment=args.attainment, seed=args.seed, **sim_kw)
        rows.append(dict(layout=str(layout), devices=layout.devices, **summarize(res),
                         attained=res.attainment(args.slo_ttft, args.slo_tpot), goodput=best))
    rows.sort(key=lambda r: -r["goodput"] / r["devices"])
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(layouts_table(rows))
        print(f"\nbest: {rows[0]['layout']} ({rows[0]['goodput'] / rows[0]['devices']:.2f} req/s per device "
              f"within TTFT <= {args.slo_ttft:g} s and TPOT <= {args.slo_tpot:g} s for "
              f"{args.attainment:.0%} of requests)")
    return 0
