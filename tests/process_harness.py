"""Child processes for the multi-device and multi-process tests: run, launch, ask, stop.

A test file that needs more CPU devices than the suite's one, or several processes, runs
itself as a script (its modes at the bottom) through these helpers:

- ``run_child``: one child with ``devices`` simulated CPU devices; its last JSON line back.
- ``launch_children``: ``num_processes`` children under ``energon launch`` (one
  ``jax.distributed`` run on 127.0.0.1); in each, ``lead_or_serve`` runs the controller's
  side or a worker's, and ``write_result`` hands the result back.
- ``cpu_env``, ``free_port``: a child's environment, a port on 127.0.0.1 nobody holds.
- ``ask_when_serving``, ``stop``: a launched ``energon serve``: wait for SERVING over gRPC, one
  greedy request, then SIGTERM (SIGKILL when it does not exit).

Every wait is bounded. (``serving_harness.py`` runs single-process ``energon serve`` for
the serving tests.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def cpu_env(*, pythonpath: bool = False) -> dict[str, str]:
    """This environment for a child on CPU: ``JAX_PLATFORMS=cpu`` and no ``XLA_FLAGS`` (one device
    per process unless the launcher says otherwise); ``pythonpath``: the repo and tests/ importable."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    return env


def free_port() -> int:
    from energon_jax.parallel.launch import free_port as launch_free_port

    return launch_free_port()


def run_child(script: str, *args: str, devices: int = 8, timeout: int = 600) -> dict:
    """Run ``script`` (a test file) as a child with ``devices`` CPU devices; return its JSON line."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"child {script} {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise AssertionError(f"child printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def launch_children(script: str, mode: str, outdir: Path, *, devices_per_process: int,
                    num_processes: int = 2) -> list[dict]:
    """Run ``script mode outdir`` as ``num_processes`` processes of one ``jax.distributed`` run
    (``energon launch``), each with ``devices_per_process`` CPU devices; every one must exit 0.
    Returns what each wrote with ``write_result``, process 0 first."""
    from energon_jax.parallel.launch import LaunchConfig, launch

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    code = launch([sys.executable, script, mode, str(outdir)],
                  LaunchConfig(num_processes=num_processes, cpu_devices_per_process=devices_per_process, grace_s=10),
                  env=env)
    assert code == 0
    return [json.loads((Path(outdir) / f"multi-{i}.json").read_text()) for i in range(num_processes)]


def lead_or_serve(controller: Any, lead: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """In a launched child: process 0 (``controller.is_controller``) runs ``lead()``, which plans
    and runs every step, then stops the workers; any other process serves the steps it is sent
    until then. Returns ``lead()``'s result (process 0) or ``{}``, with ``steps``: how many steps
    this process ran."""
    if controller.is_controller:
        try:
            out = lead()
            out["steps"] = controller.steps
        finally:
            controller.shutdown()
        return out
    return {"steps": controller.serve()}


def write_result(outdir: str, out: dict[str, Any]) -> None:
    """In a launched child: write this process's result for ``launch_children``, then leave the
    ``jax.distributed`` run."""
    import jax

    from energon_jax.parallel import distributed

    with open(os.path.join(outdir, f"multi-{jax.process_index()}.json"), "w") as f:
        json.dump(out, f)
    distributed.shutdown()


def ask_when_serving(proc: subprocess.Popen, port: int, prompt: str, *, max_tokens: int, tries: int,
                     timeout_s: float, log: Path | None = None) -> tuple[Any, str]:
    """Wait until the gRPC server on ``port`` is SERVING (polled every 0.5 s, ``tries`` times at
    most, ``proc`` alive throughout), then one greedy Generate of ``prompt``.
    Returns ``(ModelInfo, text)``; ``log``: shown when ``proc`` exits first."""
    import asyncio

    from grpc_health.v1 import health_pb2

    from serving.client import ClientConfig, InferenceClient, sampling_params

    async def talk():
        async with InferenceClient(ClientConfig(target=f"127.0.0.1:{port}")) as client:
            for _ in range(tries):
                assert proc.poll() is None, "the launcher exited before serving" + (
                    "" if log is None else f":\n{log.read_text()[-3000:]}")
                try:
                    if await client.health(timeout=2.0) == health_pb2.HealthCheckResponse.SERVING:
                        break
                except Exception:  # not listening yet
                    pass
                await asyncio.sleep(0.5)
            info = await client.model_info(timeout=10)
            params = sampling_params(max_tokens=max_tokens, temperature=0.0)
            text = "".join([r.text async for r in client.generate(prompt, params, timeout=timeout_s)])
            return info, text

    return asyncio.run(talk())


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 90) -> int:
    """Send ``sig`` (when it still runs) and wait; SIGKILL after ``timeout_s``. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
