"""Start-up time of ``energon serve``: a cold compilation cache, a warm one, and none.

Usage::

    python benchmarks/startup.py [--model PATH] [--repeats 2] [-- extra serve flags]

Each round starts ``energon serve`` on 127.0.0.1 (free ports) three times and times
each from launch until gRPC health says SERVING (model loaded, every bucket shape
compiled, the warm-up request answered), then stops it with SIGTERM:

1. ``--compile-cache`` pointing at a new, empty directory (first start);
2. the same directory again (second start: every compile should be a cache hit);
3. ``--no-compile-cache`` (what every start cost before the cache).

It prints one row per start with the time, the executables in the cache after it and
the step compiles the server logged. Copy the output into benchmarks/RESULTS.md with
the machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from energon_jax.compile_cache import count_entries  # noqa: E402


def _serve_flags(extra: list[str]) -> list[str]:
    return ["--port", "0", "--metrics-port", "0", "--http-port", "0", *extra]


def _wait_serving(port_file: Path, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError("server did not bind")
        time.sleep(0.05)
    port = json.loads(port_file.read_text())["port"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"server not SERVING within {timeout_s} s")


def start_once(flags: list[str], tmp: Path, timeout_s: float) -> tuple[float, int]:
    """Seconds from launch to SERVING, and the step compiles the server logged."""
    port_file, log = tmp / "ports.json", tmp / "server.log"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "energon_jax.cli", "serve", "--port-file", str(port_file), *flags]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_serving(port_file, proc, log, timeout_s)
            elapsed = time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return elapsed, log.read_text(errors="replace").count("compiled step #")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded demo model)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of (cold, warm, off)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one start may take")
    ap.add_argument("extra", nargs="*", help="more `energon serve` flags (after --)")
    args = ap.parse_args()
    extra = (["--model", args.model] if args.model else []) + args.extra
    print(f"# energon serve start-up, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"model: {args.model or 'embedded demo model'}; serve flags: {' '.join(_serve_flags(extra))}")
    print("| round | start | seconds to SERVING | cache entries after | step compiles logged |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="energon-startup-") as tmp_name:
        tmp = Path(tmp_name)
        for r in range(args.repeats):
            cache = tmp / f"xla-{r}"
            runs = (
                ("first (empty cache)", ["--compile-cache", str(cache)]),
                ("second (same cache)", ["--compile-cache", str(cache)]),
                ("no cache", ["--no-compile-cache"]),
            )
            for name, flags in runs:
                seconds, compiles = start_once(_serve_flags(flags + extra), tmp, args.timeout)
                entries = count_entries(cache) if "--compile-cache" in flags else "-"
                print(f"| {r} | {name} | {seconds:.1f} | {entries} | {compiles} |", flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
