"""The processes ``benchmarks/disagg.py`` starts: each layout's servers, and the planner's
step calibration pinned like them.

- ``start_layout``: one layout's ``energon`` processes on 127.0.0.1, each server pinned with
  ``taskset -c``: **colocated** (one ``energon serve`` on ``--colocated-cpus``),
  **colocated-1core** (the same on ``--prefill-cpus``) or **disaggregated** (``energon serve
  --role prefill`` on ``--prefill-cpus``, ``--role decode`` on ``--decode-cpus``, and an
  unpinned ``energon router`` in front); returns the gRPC target once every process is SERVING.
- ``Processes``: those subprocesses, stopped when the ``with`` block ends (SIGTERM, then
  SIGKILL) or when the benchmark dies (even by SIGKILL, on Linux).
- ``calibrate_pinned``: the planner's step model (``energon_jax/planner.py``) fitted in a
  process pinned like a server: this file run as a script, on an engine with the servers' limits.

The script is that calibration (``disagg.py`` runs it; by hand, for one core)::

    JAX_PLATFORMS=cpu taskset -c 0 python benchmarks/disagg_servers.py --calibrate-to /tmp/cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

# colocated-1core (not run by default): one colocated server on the prefill server's CPUs,
# the planner's one-device layout, a third configuration to check its prediction on.
# Each layout gets its own calibration (pinned like its server; a role engine does not plan ahead).
LAYOUTS = ("colocated", "disaggregated", "colocated-1core")
DEFAULT_LAYOUTS = LAYOUTS[:2]


def add_engine_flags(group: argparse._ArgumentGroup) -> None:
    """The engine's flags, the same in every server and in the calibration."""
    group.add_argument("--model", default=None, help="checkpoint (default: the embedded demo model)")
    group.add_argument("--max-model-len", type=int, default=512)
    group.add_argument("--max-num-seqs", type=int, default=16)
    group.add_argument("--max-num-batched-tokens", type=int, default=256)


def engine_flags(args: argparse.Namespace) -> list[str]:
    """``add_engine_flags``' values, as the command line of a server or a calibration."""
    flags = [f"--max-model-len={args.max_model_len}", f"--max-num-seqs={args.max_num_seqs}",
             f"--max-num-batched-tokens={args.max_num_batched_tokens}"]
    return flags + (["--model", args.model] if args.model else [])


def check_cpus(args: argparse.Namespace) -> None:
    """Exit unless ``taskset`` exists and every ``--*-cpus`` list is within this process's CPUs."""
    if shutil.which("taskset") is None:
        raise SystemExit("taskset is not installed (util-linux): the servers must be pinned to cores")
    have = os.sched_getaffinity(0)
    for flag in ("colocated_cpus", "prefill_cpus", "decode_cpus"):
        value = getattr(args, flag)
        cpus = {int(c) for part in value.split(",") for c in
                (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}
        if not cpus <= have:
            raise SystemExit(f"--{flag.replace('_', '-')}={value} names CPUs outside this process's {sorted(have)}")


# --- the servers --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Processes:
    """``energon`` subprocesses on 127.0.0.1, each pinned with ``taskset``; all stopped on exit."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="energon-disagg-bench-")
        self._procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, cpus: str | None, args: Sequence[str], timeout_s: float = 300.0) -> str:
        """Start ``energon ARGS`` (pinned to ``cpus`` unless None); its target once it serves."""
        port_file, log = Path(self._tmp.name) / f"{name}.json", Path(self._tmp.name) / f"{name}.log"
        cmd = [sys.executable, "-m", "energon_jax.cli", *args, "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(port_file)]
        if cpus is not None:
            cmd = ["taskset", "-c", cpus, *cmd]
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)
        self._procs.append((name, proc, log))
        deadline = time.monotonic() + timeout_s
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} did not start (rc={proc.poll()}):\n{tail}")
            time.sleep(0.1)
        target = f"127.0.0.1:{json.loads(port_file.read_text())['port']}"
        _wait_serving(target, proc, deadline, name)
        return target

    def stop(self) -> None:
        """SIGTERM to every process, then SIGKILL to any still running after 15 s."""
        for _, proc, _ in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc, _ in self._procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                print(f"{name} ignored SIGTERM; killing it", file=sys.stderr)
                proc.kill()
                proc.wait(timeout=10)
        self._procs.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()


def _wait_serving(target: str, proc: subprocess.Popen, deadline: float, name: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.RpcError):
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} at {target} is not serving (rc={proc.poll()})")
            time.sleep(0.2)


def start_layout(procs: Processes, layout: str, args: argparse.Namespace) -> str:
    """Start ``layout``'s servers; the gRPC target clients talk to."""
    engine = engine_flags(args)
    if args.no_warmup:  # `energon serve --no-warmup`, the role servers' too (the router has no engine)
        engine.append("--no-warmup")
    if layout.startswith("colocated"):
        cpus = args.colocated_cpus if layout == "colocated" else args.prefill_cpus
        return procs.start(layout, cpus, ["serve", *engine, "--no-http", "--no-metrics"])
    prefill = procs.start("prefill", args.prefill_cpus, ["serve", "--role", "prefill", *engine])
    decode = procs.start("decode", args.decode_cpus, ["serve", "--role", "decode", *engine])
    return procs.start("router", None, ["router", "--prefill", prefill, "--decode", decode])


# --- the pinned calibration ---------------------------------------------------------------------


def calibrate_pinned(cpus: str, plans_ahead: bool, args: argparse.Namespace) -> dict:
    """The planner's step model, measured in a process pinned to ``cpus`` (as the server is), on
    an engine that plans ahead (a colocated server) or not (a role server)."""
    with tempfile.TemporaryDirectory(prefix="energon-calib-") as tmp:
        out = Path(tmp) / "cost.json"
        cmd = ["taskset", "-c", cpus, sys.executable, str(Path(__file__).resolve()), "--calibrate-to", str(out),
               *engine_flags(args), *([] if plans_ahead else ["--calibrate-sync"])]
        if args.full_calibration:
            cmd.append("--full-calibration")
        subprocess.run(cmd, cwd=REPO, check=True, preexec_fn=_die_with_parent,
                       env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
        return json.loads(out.read_text())


def _calibrate_here(args: argparse.Namespace) -> None:
    """``--calibrate-to``: fit the step model in this (pinned) process, write it as JSON."""
    from energon_jax import Engine
    from energon_jax.planner import calibrate, fit_error, fit_step_cost, measure_steps

    engine = Engine.from_pretrained(args.model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens, warmup=False,
                                    async_scheduling=not args.calibrate_sync)
    if args.full_calibration:
        cost, samples = calibrate(engine)
    else:  # between the planner's quick and full points: both decode contexts, three row counts
        budget = args.max_num_batched_tokens
        samples = measure_steps(engine, prompt_lens=sorted({16, 64, min(128, budget), budget}),
                                decode_rows=sorted({1, min(4, args.max_num_seqs), args.max_num_seqs}),
                                decode_contexts=[32, min(256, args.max_model_len // 2)], decode_steps=8, repeats=2)
        cost = fit_step_cost(samples, tuple(engine.buckets.token_buckets))
    record = dataclasses.asdict(cost) | {"fit_error": fit_error(cost, samples), "samples": len(samples)}
    Path(args.calibrate_to).write_text(json.dumps(record))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrate-to", type=Path, required=True, help="write the fitted step model here (JSON)")
    add_engine_flags(ap.add_argument_group("engine (the servers' limits)"))
    ap.add_argument("--calibrate-sync", action="store_true",
                    help="an engine that does not plan ahead (a role server's)")
    ap.add_argument("--full-calibration", action="store_true", help="the planner's full step calibration")
    args = ap.parse_args(argv)
    # SIGTERM (disagg.py killed: PR_SET_PDEATHSIG) ends the calibration like an exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _calibrate_here(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
