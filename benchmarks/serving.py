"""Serving benchmark: what gRPC serving costs over the engine, and latency under load.

Usage::

    python benchmarks/serving.py [--model PATH] [--num-requests 256] [--rates 4 16 64]
                                 [--backends grpc openai] [--no-baselines]

Starts ``energon serve`` on 127.0.0.1 (free ports) over ``--model`` (default:
the embedded demo model), then, with one seeded workload (long-tailed prompt and
output lengths, per-request sampling seeds, ``ignore_eos``):

1. baseline: the workload as a burst straight into an in-process ``AsyncEngine``
   with the same engine settings (no gRPC, no second process);
2. the same burst through the server, once per ``--backends`` entry: ``grpc``
   (an asyncio gRPC client) and/or ``openai`` (streamed ``/v1/completions`` on the
   server's HTTP port, httpx); 1 and 2 alternate ``--repeats`` times so drift in the
   machine's load hits every one, and the backends take turns going first;
3. Poisson arrivals at each of ``--rates`` requests/s through the server, again
   once per backend, one after the other on the same server;
4. the offline ceiling: the whole workload through ``Engine.generate`` at once.

``--no-baselines`` skips 1 and 4 (no in-process engine: half the compiles).
It prints, for each, TTFT, TPOT, inter-token latency and end-to-end latency at
p50/p90/p99, throughput and goodput under the TTFT/TPOT SLOs, then the ratio of
served to direct throughput and TTFT measured in this same run and, with two
backends, HTTP against gRPC on the same loads. Copy the output into
benchmarks/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.client import ClientConfig, InferenceClient  # noqa: E402
from serving.loadgen import (  # noqa: E402
    GrpcBackend,
    Record,
    Summary,
    WorkItem,
    format_summary,
    new_request_id,
    run_open_loop,
    summarize,
    synthetic_workload,
)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, int]:
    return dict(
        max_model_len=args.max_model_len,
        page_size=args.page_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def start_server(args: argparse.Namespace, port_file: Path, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "energon_jax.cli", "serve", "--port", "0", "--metrics-port", "0"]
    cmd += ["--port-file", str(port_file), "--max-queue", str(max(256, args.num_requests))]
    cmd += ["--http-port", "0"]  # the OpenAI HTTP API on a free port, never a fixed 8000
    if args.model:
        cmd += ["--model", args.model]
    for k, v in _engine_kwargs(args).items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    log = open(log_path, "wb")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))


async def wait_serving(target: str, proc: subprocess.Popen, timeout_s: float) -> None:
    from grpc_health.v1 import health_pb2

    deadline = time.monotonic() + timeout_s
    async with InferenceClient(ClientConfig(target=target)) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if await client.health(timeout=5) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except Exception:  # not up yet
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"server not SERVING within {timeout_s} s")


async def run_direct(engine, items: list[WorkItem]) -> list[Record]:
    """The baseline: the same requests into an in-process AsyncEngine, timed the same way."""
    from energon_jax import SamplingParams

    async def one(item: WorkItem) -> Record:
        p = item.params
        params = SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, seed=p.seed, ignore_eos=True)
        rec = Record(new_request_id(item.label), label=item.label, sent=time.perf_counter())
        async for delta in engine.submit(item.prompt, params, request_id=rec.request_id):
            now = time.perf_counter()
            rec.token_ids.extend(delta.token_ids)
            rec.token_times.extend([now] * len(delta.token_ids))
            if delta.finished:
                rec.finish_reason = delta.finish_reason or ""
        rec.done = time.perf_counter()
        return rec

    return list(await asyncio.gather(*(one(it) for it in items)))


def _print_errors(records: list[Record]) -> None:
    for e in sorted({f"{r.error}: {r.error_details}" for r in records if r.error})[:5]:
        print(f"error: {e}")


async def served(backend: str, targets: dict[str, str], items: list[WorkItem]) -> list[Record]:
    """The items through the server over one backend: ``grpc`` or ``openai``."""
    if backend == "openai":
        from serving.loadgen_http import HttpTarget, open_backend

        async with open_backend(HttpTarget(targets["openai"])) as (http, _):
            return await run_open_loop(http, items, timeout_s=900)
    async with InferenceClient(ClientConfig(target=targets["grpc"])) as client:
        return await run_open_loop(GrpcBackend(client), items, timeout_s=900)


_LABEL = {"grpc": "gRPC", "openai": "HTTP (OpenAI /v1/completions)"}


def compare_backends(results: dict[str, Summary], loads: list[str]) -> None:
    """HTTP against gRPC on each load of this run: TTFT/TPOT/ITL p50/p99 and goodput."""
    print("\n## HTTP (OpenAI API) vs gRPC, same server, same workload, same run")
    print("| load | backend | errors | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | ITL p50 | ITL p99 "
          "| tok/s | goodput |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for load in loads:
        for backend in ("grpc", "openai"):
            s = results[f"{backend} {load}"]
            ms = [1000 * x for x in (s.ttft_s["p50"], s.ttft_s["p99"], s.tpot_s["p50"], s.tpot_s["p99"],
                                     s.itl_s["p50"], s.itl_s["p99"])]  # fmt: skip
            print(f"| {load} | {backend} | {s.errors} | " + " | ".join(f"{x:.1f} ms" for x in ms)
                  + f" | {s.token_throughput:.1f} | {s.goodput_share * 100:.1f}% ({s.goodput:.2f} req/s) |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded demo model)")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rates", type=float, nargs="*", default=[8.0, 32.0])
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(8, 192))
    ap.add_argument("--output-len", type=int, nargs=2, default=(8, 64))
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=100.0)
    ap.add_argument("--repeats", type=int, default=2, help="alternating direct/served burst rounds")
    ap.add_argument("--backends", nargs="+", choices=("grpc", "openai"), default=["grpc"],
                    help="front ends to drive, each in turn on the same server and workload")  # fmt: skip
    ap.add_argument("--no-baselines", action="store_true",
                    help="skip the in-process AsyncEngine burst and the offline Engine.generate ceiling")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    backends = list(dict.fromkeys(args.backends))

    slo = dict(ttft_slo_s=args.ttft_slo_ms / 1000, tpot_slo_s=args.tpot_slo_ms / 1000)
    print(f"# energon serving benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"model: {args.model or 'embedded demo model'}, engine {_engine_kwargs(args)}, backends {backends}")

    engine = None
    if not args.no_baselines:
        from energon_jax import AsyncEngine

        t0 = time.perf_counter()
        engine = AsyncEngine.from_pretrained(args.model, **_engine_kwargs(args))
        engine.start()
        vocab = engine.info.vocab_size
        print(f"in-process engine ready in {time.perf_counter() - t0:.1f} s (load + compile)")
    else:
        from models.loading import load_config

        from energon_jax.engine_config import demo_model_path

        vocab = load_config(args.model or demo_model_path()).vocab_size

    def workload(rate: float | None) -> list[WorkItem]:
        return synthetic_workload(
            args.num_requests, seed=args.seed, vocab_size=vocab, prompt_len=tuple(args.prompt_len),
            output_len=tuple(args.output_len), rate=rate,
        )  # fmt: skip

    results: dict[str, Summary] = {}
    if engine is not None:
        asyncio.run(run_direct(engine, workload(None)[:8]))  # touch every path once, untimed
    pairs: dict[str, list[tuple[Summary | None, Summary]]] = {b: [] for b in backends}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        port_file, log_path = Path(tmp) / "ports.json", Path(tmp) / "server.log"
        proc = start_server(args, port_file, log_path)
        try:
            while not port_file.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited:\n{log_path.read_text()}")
                time.sleep(0.2)
            ports = json.loads(port_file.read_text())
            targets = {"grpc": f"127.0.0.1:{ports['port']}"}
            if ports.get("http_port"):
                targets["openai"] = f"http://127.0.0.1:{ports['http_port']}"
            asyncio.run(wait_serving(targets["grpc"], proc, 900))
            for b in backends:
                asyncio.run(served(b, targets, workload(None)[:8]))  # same untimed touch as the baseline
            # Direct and served bursts alternate, so drift in the machine's load hits each.
            for rep in range(args.repeats):
                direct = None
                if engine is not None:
                    direct = summarize(asyncio.run(run_direct(engine, workload(None))), **slo)
                    print(format_summary(direct, f"\n## [{rep}] baseline: burst into an in-process AsyncEngine"))
                    results[f"direct burst {rep}"] = direct
                for b in backends if rep % 2 == 0 else backends[::-1]:  # neither always goes first
                    recs = asyncio.run(served(b, targets, workload(None)))
                    burst = summarize(recs, **slo)
                    print(format_summary(burst, f"\n## [{rep}] served over {_LABEL[b]}: the same burst"))
                    _print_errors(recs)
                    pairs[b].append((direct, burst))
                    results[f"{b} burst {rep}"] = burst
                loads.append(f"burst {rep}")
            for i, rate in enumerate(args.rates):
                for b in backends if i % 2 == 0 else backends[::-1]:
                    recs = asyncio.run(served(b, targets, workload(rate)))
                    s = summarize(recs, **slo)
                    results[f"{b} Poisson {rate:g}"] = s
                    print(format_summary(s, f"\n## served over {_LABEL[b]}: Poisson {rate:g} req/s"))
                    _print_errors(recs)
                loads.append(f"Poisson {rate:g}")
        finally:
            if engine is not None:
                engine.shutdown()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print(f"\nserver exit code after SIGTERM: {proc.returncode}")

    if len(backends) == 2:
        compare_backends(results, loads)
    if engine is not None:
        _print_baseline_ratios(engine, workload(None), pairs)
    if args.json is not None:
        from dataclasses import asdict

        args.json.write_text(json.dumps({k: asdict(v) for k, v in results.items()}, indent=2))
    return 0


def _print_baseline_ratios(engine, items: list[WorkItem], pairs: dict[str, list]) -> None:
    # Offline ceiling: the whole workload handed to Engine.generate at once, no asyncio,
    # no client in the way (the AsyncEngine's step thread has stopped; its Engine is idle).
    from energon_jax import SamplingParams

    params = [
        SamplingParams(
            max_tokens=i.params.max_tokens, temperature=i.params.temperature, seed=i.params.seed, ignore_eos=True
        )
        for i in items
    ]
    t0 = time.perf_counter()
    outs = engine.engine.generate([i.prompt for i in items], params, use_tqdm=False)
    offline_s = time.perf_counter() - t0
    offline_tps = sum(len(o.token_ids) for o in outs) / offline_s
    print(f"\n## offline Engine.generate, same workload: {offline_s:.2f} s, {offline_tps:.1f} tok/s")
    for backend, rounds in pairs.items():
        print(f"\n## served over {_LABEL[backend]} / baselines, same burst, same run (one line per round)")
        ratios = ", ".join(f"{b.token_throughput / offline_tps:.3f}" for _, b in rounds)
        print(f"served tok/s / offline Engine.generate tok/s, per round: {ratios}")
        print("| round | tok/s ratio | TTFT p50 ratio | TPOT p50 ratio |")
        print("|---|---|---|---|")
        for i, (d, b) in enumerate(rounds):
            print(
                f"| {i} | {b.token_throughput / d.token_throughput:.3f} | {b.ttft_s['p50'] / d.ttft_s['p50']:.3f} "
                f"| {b.tpot_s['p50'] / d.tpot_s['p50']:.3f} |"
            )


if __name__ == "__main__":
    sys.exit(main())
