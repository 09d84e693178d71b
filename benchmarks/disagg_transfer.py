"""Time one request's KV page transfer (``disagg.PageMover``) against a decode step of the same engine.

A disaggregated demo-model engine (``prefill_devices=1, decode_devices=1``; on the CPU
the two groups are two simulated devices, so set
``XLA_FLAGS=--xla_force_host_platform_device_count=2``) serves ``--rows`` greedy requests
of ``--prompt-len`` tokens. Measured in the same run:

- transfer: moving one request's pages (``ceil(prompt_len / page_size)`` pages, every layer,
  gather + ``jax.device_put`` + scatter) from the prefill pool to the decode pool, median
  of ``--reps`` moves, each waited for;
- decode step: the median wall time of ``Engine.step`` once every request decodes (no
  prefill left), ``--rows`` rows at a context of about ``prompt_len`` (no warm-up: the
  median is past the one step that compiles).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/disagg_transfer.py --prompt-len 128
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=8, help="requests decoding at once")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    import jax

    from energon_jax import Engine, SamplingParams

    engine = Engine.from_pretrained(None, prefill_devices=1, decode_devices=1, page_size=args.page_size,
                                    max_num_seqs=args.rows, max_num_batched_tokens=max(256, args.prompt_len),
                                    max_model_len=args.prompt_len + args.max_tokens + 8, warmup=False)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(args.rows):
        engine.add_request([(7 * i + j) % 4000 + 1 for j in range(args.prompt_len)], sp)
    steps = []
    sched = engine.scheduler
    while engine.has_unfinished():
        decode_only = not (sched.inbox or sched.pending or sched.prefill.has_work()) and sched.decode.num_running
        start = time.perf_counter()
        engine.step()
        if decode_only and sched.decode.num_running == args.rows:
            steps.append(time.perf_counter() - start)

    runner = engine.runner
    n = -(-args.prompt_len // args.page_size)
    src = list(range(1, n + 1))
    dst = list(range(n + 1, 2 * n + 1))
    moves = []
    for _ in range(args.reps):
        jax.block_until_ready(runner.decode.kv_cache)
        start = time.perf_counter()
        runner.transfer(src, dst)
        jax.block_until_ready(runner.decode.kv_cache)
        moves.append(time.perf_counter() - start)
    per_page = runner.mover.stats.bytes / runner.mover.stats.pages
    move_ms, step_ms = 1e3 * statistics.median(moves), 1e3 * statistics.median(steps)
    print(f"backend {jax.default_backend()}, {jax.device_count()} devices; demo model; page_size {args.page_size}")
    print(f"transfer of one {args.prompt_len}-token request: {n} pages, {n * per_page / 2**20:.2f} MiB: "
          f"{move_ms:.2f} ms (median of {args.reps})")
    print(f"decode step, {args.rows} rows at context ~{args.prompt_len}: {step_ms:.2f} ms "
          f"(median of {len(steps)} steps)")
    print(f"transfer / decode step = {move_ms / step_ms:.2f}")


if __name__ == "__main__":
    main()
