"""Multi-controller generation on one machine: N processes, one model sharded across all of them.

    python examples/multiprocess_local.py "Once upon a time"          # starts 2 x 2 CPU devices itself
    python examples/multiprocess_local.py --processes 4 --devices 2 --tp 8 "Hello"
    energon launch -n 2 --cpu-devices-per-process 2 -- \\
        python examples/multiprocess_local.py --tp 4 "Once upon a time"   # the same, by hand

What happens: every process joins one ``jax.distributed`` run (``energon launch`` gives
each its coordinator address and index), loads the same checkpoint (the embedded demo
model unless ``--model``), and ``Engine(tp=...)`` shards it over the devices of all
processes. Process 0 owns the scheduler: it streams the text and broadcasts each step;
the other processes run the same steps (``engine.runner.serve()``) until process 0 is
done. On a TPU pod the same code runs with one process per host (examples/tpu_pod/).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--processes", type=int, default=2, help="processes to start when not under energon launch")
    p.add_argument("--devices", type=int, default=2, help="simulated CPU devices per process (self-launch)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ways (default: every device)")
    p.add_argument("--max-tokens", type=int, default=32)
    return p.parse_args()


def self_launch(args: argparse.Namespace) -> int:
    """Not started by energon launch: start the processes ourselves, same arguments."""
    from energon_jax.parallel.launch import LaunchConfig, launch

    config = LaunchConfig(num_processes=args.processes, cpu_devices_per_process=args.devices)
    return launch([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], config)


def main() -> int:
    args = parse_args()
    if "ENERGON_PROCESS_ID" not in os.environ:
        return self_launch(args)

    from energon_jax.parallel import distributed

    distributed.initialize_from_env()  # before anything touches a device
    import jax

    from energon_jax import engine as engine_lib
    from energon_jax.parallel.controller import serve_if_worker, shutdown_workers
    from energon_jax.request import SamplingParams

    tp = args.tp or jax.device_count()
    engine = engine_lib.Engine.from_pretrained(args.model, tp=tp, max_model_len=256, max_num_seqs=4,
                                               max_num_batched_tokens=64)
    runner = engine.runner  # a Controller when there is more than one process
    if serve_if_worker(runner):  # workers: run process 0's steps until it is done
        print(f"[process {jax.process_index()}] ran {runner.steps} steps", file=sys.stderr)
        distributed.shutdown()
        return 0
    try:
        print(f"[process 0] {jax.process_count()} processes, {jax.device_count()} devices, tp={tp}", file=sys.stderr)
        print(args.prompt, end="", flush=True)
        for delta in engine.stream(args.prompt, SamplingParams(max_tokens=args.max_tokens, temperature=0.0)):
            print(delta.text, end="", flush=True)
        print()
    finally:
        shutdown_workers(runner)  # the workers return from serve()
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
