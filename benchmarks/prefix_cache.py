"""Automatic prefix caching: the same workload with caching off and on, in one run.

Workload: ``--num-requests`` requests (48 by default) over ``--num-prompts`` system
prompts (4, of 512..2048 tokens, evenly spaced), each request one system prompt (round
robin) plus a unique random suffix sized so that ``--shared`` (80% by default) of its
prompt tokens are the system prompt; every request generates ``--max-tokens`` tokens
(greedy, eos ignored). Clients: a closed loop of ``--concurrency`` users, each sending
its next request when the previous one finished (all requests are queued by then, so
both engines see the same offered work). Model: a random Llama-architecture checkpoint
(``--layers``, ``--hidden``), built with ``transformers`` as ``offline.py`` does.

Printed (markdown, for ``benchmarks/RESULTS.md``): per engine the time to first token
(p50, p99: ``RequestOutput.ttft_s``, queueing included), output tokens/s over the whole
run, prompt tokens computed vs served from the cache (the hit rate), and the ratios on /
off. Greedy tokens of both runs are compared (they must be equal).

Run on the CPU: ``JAX_PLATFORMS=cpu python benchmarks/prefix_cache.py`` (``--quick``: a
smoke run with shorter prompts).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline import make_checkpoint  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def make_prompts(n: int, k: int, *, lengths: tuple[int, int], shared: float, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts over ``k`` system prompts (round robin) plus unique suffixes: ``shared`` of each prompt is system."""
    rng = np.random.default_rng(seed)
    sys_lens = np.linspace(lengths[0], lengths[1], k).astype(int)
    systems = [rng.integers(3, vocab, int(s)).tolist() for s in sys_lens]
    prompts = []
    for i in range(n):
        system = systems[i % k]
        suffix = max(1, round(len(system) * (1 - shared) / shared))
        prompts.append(system + rng.integers(3, vocab, suffix).tolist())
    return prompts


def run_closed_loop(engine, prompts: list[list[int]], params, concurrency: int) -> dict:
    """``concurrency`` users, each sending its next prompt when its last one finished."""
    todo = list(range(len(prompts)))[::-1]
    rids: dict[str, int] = {}
    outs: dict[int, object] = {}
    start = time.perf_counter()
    for _ in range(min(concurrency, len(todo))):
        i = todo.pop()
        rids[engine.add_request(prompts[i], params)] = i
    while rids:
        for delta in engine.step():
            if delta.finished and delta.request_id in rids:
                i = rids.pop(delta.request_id)
                outs[i] = engine.take_output(delta.request_id)
                if todo:
                    j = todo.pop()
                    rids[engine.add_request(prompts[j], params)] = j
    wall = time.perf_counter() - start
    ordered = [outs[i] for i in range(len(prompts))]
    ttft = np.array([o.ttft_s for o in ordered])
    out_tokens = sum(len(o.token_ids) for o in ordered)
    return {
        "tokens": [o.token_ids for o in ordered],
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p99": float(np.percentile(ttft, 99)),
        "tok_s": out_tokens / wall,
        "wall_s": wall,
        "prompt_tokens": sum(len(p) for p in prompts),
        "cached_tokens": sum(o.num_cached_tokens for o in ordered),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 12 requests, system prompts of 128..256 tokens")
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--num-prompts", type=int, default=4, help="distinct system prompts")
    ap.add_argument("--min-system", type=int, default=512)
    ap.add_argument("--max-system", type=int, default=2048)
    ap.add_argument("--shared", type=float, default=0.8, help="share of each prompt that is its system prompt")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    args = ap.parse_args()
    if args.quick:
        args.num_requests, args.min_system, args.max_system = 12, 128, 256
    if not 0.0 < args.shared < 1.0:
        raise SystemExit(f"--shared={args.shared} must be in (0, 1)")

    import jax

    from energon_jax import Engine, SamplingParams

    # Both engines compile the same step shapes: the second one reads them from a disk cache.
    cache_dir = tempfile.mkdtemp(prefix="energon-bench-xla-")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    prompts = make_prompts(args.num_requests, args.num_prompts, lengths=(args.min_system, args.max_system),
                           shared=args.shared, vocab=args.vocab, seed=args.seed)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    max_len = max(map(len, prompts)) + args.max_tokens
    kw = dict(max_model_len=max_len, page_size=16, max_num_seqs=args.concurrency,
              max_num_batched_tokens=args.max_num_batched_tokens)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), layers=args.layers, hidden=args.hidden, vocab=args.vocab, max_len=max_len)
        for name, caching in (("off", False), ("on", True)):
            engine = Engine.from_pretrained(path, dtype="float32", enable_prefix_caching=caching,
                                            prefix_cache_seed=0, **kw)
            results[name] = run_closed_loop(engine, prompts, params, args.concurrency)
            results[name]["compiles"] = engine.num_compiles
            del engine
    off, on = results["off"], results["on"]
    same = off["tokens"] == on["tokens"]
    lens = [len(p) for p in prompts]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU threads, "
          f"jax {jax.__version__} ({jax.default_backend()}); {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"workload: {args.num_requests} requests over {args.num_prompts} system prompts of "
          f"{args.min_system}..{args.max_system} tokens, {args.shared:.0%} of each prompt shared, prompts "
          f"{min(lens)}..{max(lens)} tokens, {args.max_tokens} output tokens each, {args.concurrency} concurrent "
          f"users (closed loop); model: random Llama, {args.layers} layers, hidden {args.hidden}, vocab "
          f"{args.vocab}, float32; budget {args.max_num_batched_tokens} tokens/step, page 16")
    print()
    print("| prefix caching | TTFT p50 (s) | TTFT p99 (s) | output tok/s | wall (s) | prompt tokens from cache |")
    print("|---|---|---|---|---|---|")
    for name in ("off", "on"):
        r = results[name]
        print(f"| {name} | {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['tok_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['cached_tokens']} / {r['prompt_tokens']} ({r['cached_tokens'] / r['prompt_tokens']:.1%}) |")
    print()
    print(f"TTFT p50 off/on: {off['ttft_p50'] / on['ttft_p50']:.2f}x lower with caching (target >= 3x); "
          f"TTFT p99 off/on: {off['ttft_p99'] / on['ttft_p99']:.2f}x; throughput on/off: "
          f"{on['tok_s'] / off['tok_s']:.2f}x (target >= 1); greedy tokens identical: {same}")
    if not same:
        raise SystemExit("greedy tokens differ between caching off and on")


if __name__ == "__main__":
    main()
