"""Pipeline stage utilisation under a steady decode load, and the cost of layer offloading.

    python benchmarks/pipeline.py                      # 8 simulated CPU devices
    python benchmarks/pipeline.py --layers 8 --requests 16 --max-tokens 48

Part 1, pipeline (``parallel/pipeline.py``): a random Llama (``--layers`` layers) serves
``--requests`` greedy requests of ``--max-tokens`` tokens each through the engine's own
API, ``Engine(pp=N).generate``, for pp = 2 and 4 (the engine splits the running
requests into ``pp`` groups and keeps ``pp`` micro-batches in flight). It prints each
stage's utilisation, busy ticks over all ticks of the ``generate`` call (fill, steady
state and drain included; target >= 85%), the most micro-batches in flight at once,
whether the tokens equal the pp=1 engine's, and the wall time against the pp=1 engine
on the same requests measured in the same process (on simulated CPU devices the stages
share the host's cores, so the wall-time ratio says nothing about real devices;
utilisation is the schedule's property and holds anywhere).

Part 2, memory pool (``parallel/memory_pool.py``): the same model decoding with only
``k`` layers' weights resident on the device (the rest in host memory, prefetched a
layer ahead), against fully resident, in the same run: the slowdown ratio, and the
peak weight bytes resident on the device against one layer's bytes.

Part 3, controller (``parallel/controller.py``, ``--controller``): the same 8 devices as
1 process x 8 and as 2 processes x 4 (``energon launch``, ``jax.distributed`` on
127.0.0.1), the same model and requests through ``Engine.generate`` on process 0 (the
worker runs ``serve()``), for ``pp=2 x tp=4`` (the SPMD pipeline, ``PipelineController``)
and ``tp=8`` (``ModelRunner`` behind a ``Controller``, planning ahead). Per layout it prints
the schedule occupancy per stage, the controller's overhead per engine step (host time
publishing the header and dispatching the batch broadcast, plus the time blocked fetching
the sampled ids on process 0 or waiting for the header on the worker), the blocking waits
per step on each process, counted apart: device-to-host syncs (process 0's ids fetch) and
key-value waits (a worker's header, a message through ``jax.distributed``'s store, no
device sync), and the tokens per engine step. In one process the controller broadcasts
nothing (only its fetch is counted). On simulated CPU devices the host times include the
device work that the fetch waits for; no wall-clock speed-up is claimed from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

if "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu":
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def _requests(n: int, max_tokens: int, vocab: int):
    import numpy as np

    from energon_jax.request import Request, SamplingParams

    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [Request(request_id=f"r{i}", prompt_token_ids=rng.integers(3, vocab, int(rng.integers(2, 9))).tolist(),
                    params=params) for i in range(n)]


def _scheduler(num_pages: int, max_seqs: int, max_len: int):
    from energon_jax.scheduler import Scheduler, SchedulerConfig

    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max(16, max_seqs),
                                     max_model_len=max_len, page_size=4, num_pages=num_pages))


def run_pipeline(args) -> None:
    import jax

    from energon_jax.engine import Engine
    from energon_jax.request import SamplingParams
    from test_parallel_tp_models import build_model

    max_len = 16 + args.max_tokens
    page_size = 16
    prompts = [r.prompt_token_ids for r in _requests(args.requests, args.max_tokens, 96)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    print(f"pipeline: llama layers={args.layers}, {args.requests} requests x {args.max_tokens} tokens "
          f"through Engine(pp=N).generate, {len(jax.devices())} devices")
    base_time = base_tokens = None
    for pp in (1, 2, 4):
        model, config = build_model("llama", num_hidden_layers=args.layers)
        engine = Engine(model, config, None, max_model_len=max_len, page_size=page_size,
                        kv_cache_pages=1 + args.requests * -(-max_len // page_size), max_num_seqs=args.requests,
                        max_num_batched_tokens=max(64, args.requests), pp=pp)
        times = []
        for _ in range(2):  # the first round settles the host; the second is timed (warm-up compiled already)
            if pp > 1:
                engine.runner.reset_stats()
            start = time.perf_counter()
            outs = engine.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
        tokens = [list(o.token_ids) for o in outs]
        base_time, base_tokens = base_time or times[-1], base_tokens or tokens
        line = f"  pp={pp}: "
        if pp > 1:
            st = engine.runner.stats
            util = st.utilisation()
            line += (f"ticks={st.ticks} utilisation per stage={[f'{u:.1%}' for u in util]} (min {min(util):.1%}) "
                     f"max_in_flight={st.max_in_flight} ")
        print(line + f"tokens={sum(map(len, tokens))} same tokens as pp=1: {tokens == base_tokens} "
              f"wall={times[-1]:.2f}s ({times[-1] / base_time:.2f}x pp=1)")


def run_memory_pool(args) -> None:
    import jax
    import jax.numpy as jnp

    from energon_jax.batch import Buckets, pack
    from energon_jax.parallel.memory_pool import OFFLOAD_KINDS, OffloadConfig, OffloadedRunner
    from energon_jax.parallel.stages import decoder_parts
    from energon_jax.runner import ModelRunner
    from pallas_kernels import make_kv_pages
    from test_parallel_tp_models import build_model

    layers, k = args.layers, args.resident
    buckets = Buckets.create(max_num_batched_tokens=16, max_num_seqs=16, max_model_len=64, page_size=4, min_tokens=16)
    sched = _scheduler(1 + 16 * 16, 16, 64)
    for r in _requests(16, 32, 96):
        sched.add(r)
    plan = sched.schedule()
    batch = pack(plan, buckets)  # a real mixed prefill step of 16 rows
    model, config = build_model("llama", num_hidden_layers=layers, hidden_size=256, intermediate_size=1024,
                                num_attention_heads=8, num_key_value_heads=2)
    num_pages = 1 + 16 * 16
    kv = tuple(make_kv_pages(num_pages, 4, config.num_kv_heads, config.head_dim, jnp.float32) for _ in range(layers))
    runners = [("resident", ModelRunner(model, kv))]
    for kind in OFFLOAD_KINDS:
        if kind == "peer" and len(jax.local_devices()) < 2:
            continue
        runners.append((f"offload={kind} k={k}", OffloadedRunner(decoder_parts(model), OffloadConfig(kind, k),
                                                                  num_pages=num_pages, page_size=4)))
    print(f"memory pool: llama layers={layers}, hidden 256, step of {batch.num_tokens_bucket} tokens")
    base = None
    for name, runner in runners:
        runner.step(batch)  # compile
        rounds = []
        for _ in range(3):  # the best of 3 rounds: the least disturbed by other work on the host
            start = time.perf_counter()
            for _ in range(args.pool_steps):
                runner.step(batch)
            rounds.append((time.perf_counter() - start) / args.pool_steps)
        per_step = min(rounds)
        base = base or per_step
        extra = ""
        if isinstance(runner, OffloadedRunner):
            st = runner.stats
            extra = (f"; peak resident weights {st.peak_resident_layers} layers = {st.peak_resident_bytes} B "
                     f"(limit k+1 = {k + 1} layers = {(k + 1) * st.max_layer_bytes} B, all layers "
                     f"{sum(st.layer_bytes)} B)")
        print(f"  {name}: {per_step * 1e3:.2f} ms/step, best of 3 rounds of {args.pool_steps} "
              f"({per_step / base:.2f}x resident){extra}")


CONTROLLER_LAYOUTS = (("pp2_tp4", dict(pp=2, tp=4)), ("tp8", dict(tp=8)))


def _controller_child(args, outdir: str) -> None:
    """One process of a controller run (``--controller-child``): process 0 generates, workers serve."""
    import json

    from energon_jax.parallel import distributed

    distributed.initialize_from_env()  # False (nothing to join) in the 1-process run
    import jax

    from energon_jax.engine import Engine
    from energon_jax.parallel.controller import Controller, ControllerStats, serve_if_worker, shutdown_workers
    from energon_jax.request import SamplingParams
    from test_parallel_tp_models import build_model

    max_len, page_size = 16 + args.max_tokens, 16
    prompts = [r.prompt_token_ids for r in _requests(args.requests, args.max_tokens, 96)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    out = {"processes": jax.process_count(), "devices": jax.device_count(), "layouts": {}}
    for name, layout in CONTROLLER_LAYOUTS:
        model, config = build_model("llama", num_hidden_layers=args.layers, num_attention_heads=8,
                                    num_key_value_heads=8)
        engine = Engine(model, config, None, max_model_len=max_len, page_size=page_size,
                        kv_cache_pages=1 + args.requests * -(-max_len // page_size), max_num_seqs=args.requests,
                        max_num_batched_tokens=max(64, args.requests), **layout)
        runner = engine.runner
        if not isinstance(runner, Controller):  # one process: the engine's runner behind a (passthrough,
            # counted) controller, swapped into its loop so that both runs count the same way
            from energon_jax.batch import warmup_batches
            from energon_jax.parallel.pipeline_controller import PipelineController
            from energon_jax.parallel.spmd_pipeline import SpmdPipelineRunner

            wrap = PipelineController if isinstance(runner, SpmdPipelineRunner) else Controller
            runner = wrap(runner, warmup_batches(engine.buckets))
            engine._runner = runner
            engine._loop.runner = runner
        if serve_if_worker(runner):
            out["layouts"][name] = {"worker": dataclasses.asdict(runner.controller_stats)}
            continue
        try:
            engine.generate(prompts, params, use_tqdm=False)  # settles the host
            runner.controller_stats = ControllerStats()  # count the timed round only
            if hasattr(runner, "reset_stats"):
                runner.reset_stats()
            ahead = engine.num_planned_ahead
            start = time.perf_counter()
            outs = engine.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
        finally:
            shutdown_workers(runner)
        st = runner.controller_stats
        res = {"controller": dataclasses.asdict(st), "wall_s": wall, "tokens": [list(o.token_ids) for o in outs],
               "ahead": engine.num_planned_ahead - ahead}
        if hasattr(runner, "reset_stats"):
            res["occupancy"] = runner.stats.utilisation()
        out["layouts"][name] = res
    with open(os.path.join(outdir, f"controller-{jax.process_index()}.json"), "w") as f:
        json.dump(out, f)
    distributed.shutdown()


def run_controller(args) -> None:
    import json
    import subprocess
    import tempfile

    from energon_jax.parallel.launch import LaunchConfig, launch

    child = [sys.executable, os.path.abspath(__file__), "--controller-child", "", "--layers", str(args.layers),
             "--requests", str(args.requests), "--max-tokens", str(args.max_tokens)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    env.pop("XLA_FLAGS", None)
    runs = {}
    for procs in (1, 2):
        outdir = tempfile.mkdtemp(prefix=f"energon-ctl{procs}-")
        cmd = list(child)
        cmd[3] = outdir
        if procs == 1:
            subprocess.run(cmd, check=True, env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
        else:
            code = launch(cmd, LaunchConfig(num_processes=2, cpu_devices_per_process=4, grace_s=10), env=env)
            if code != 0:
                raise SystemExit(f"2-process controller run failed with exit code {code}")
        runs[procs] = [json.load(open(os.path.join(outdir, f"controller-{i}.json"))) for i in range(procs)]
    print(f"controller: llama layers={args.layers}, {args.requests} requests x {args.max_tokens} tokens through "
          f"Engine.generate, 8 devices as 1 process x 8 and 2 processes x 4 (load average {os.getloadavg()[0]:.1f})")
    for name, _ in CONTROLLER_LAYOUTS:
        same = runs[1][0]["layouts"][name]["tokens"] == runs[2][0]["layouts"][name]["tokens"]
        for procs in (1, 2):
            res = runs[procs][0]["layouts"][name]
            st = res["controller"]
            steps = max(st["steps"], 1)
            gen = sum(map(len, res["tokens"]))
            line = (f"  {name} {procs} process{'es' if procs > 1 else ''}: steps={st['steps']} "
                    f"tokens/step={gen / steps:.2f} planned ahead={res['ahead']} ")
            if "occupancy" in res:
                line += f"occupancy per stage={[f'{u:.1%}' for u in res['occupancy']]} "
            overhead = 1e3 * (st["broadcast_s"] + st["fetch_s"] + st["kv_wait_s"]) / steps
            line += (f"process 0: device syncs/step={st['fetch_syncs'] / steps:.2f} "
                     f"kv waits/step={st['kv_waits'] / steps:.2f} "
                     f"controller overhead={overhead:.2f} ms/step (broadcast {1e3 * st['broadcast_s'] / steps:.2f} "
                     f"+ ids fetch {1e3 * st['fetch_s'] / steps:.2f}) step wall={1e3 * res['wall_s'] / steps:.2f} ms")
            if procs > 1:
                w = runs[procs][1]["layouts"][name]["worker"]
                wsteps = max(w["steps"], 1)
                line += (f"; worker (both rounds): steps={w['steps']} device syncs/step={w['fetch_syncs'] / wsteps:.2f} "
                         f"kv waits/step={w['kv_waits'] / wsteps:.2f} (incl. stops) "
                         f"broadcast={1e3 * w['broadcast_s'] / wsteps:.2f} ms/step "
                         f"header wait={1e3 * w['kv_wait_s'] / wsteps:.2f} ms/step")
            print(line)
        print(f"  {name}: same tokens 1 vs 2 processes: {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--resident", type=int, default=1, help="memory pool: layers resident on the device")
    p.add_argument("--pool-steps", type=int, default=8, help="memory pool: decode steps timed")
    p.add_argument("--skip-pool", action="store_true")
    p.add_argument("--controller", action="store_true",
                   help="only part 3: the controller on 1 process x 8 and 2 processes x 4 devices")
    p.add_argument("--controller-child", metavar="OUTDIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.controller_child:
        _controller_child(args, args.controller_child)
        return
    if args.controller:
        run_controller(args)
        return
    run_pipeline(args)
    if not args.skip_pool:
        run_memory_pool(args)


if __name__ == "__main__":
    main()
