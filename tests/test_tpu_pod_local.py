"""``examples/tpu_pod/launch.sh --local N``: the pod's per-worker command, rehearsed on this machine.

The script builds the command every pod worker would run (``env ENERGON_DISTRIBUTED=auto
ENERGON_COORDINATOR_ADDRESS=... energon serve FLAGS``) and, with ``--local N``, runs that
same string N times here under ``energon launch`` (coordinator on 127.0.0.1). These tests
start it for real: two processes join one ``jax.distributed`` run, process 0 answers a
gRPC request with the single-device engine's greedy text, and SIGTERM (or a killed
worker) brings every process down.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from process_harness import ask_when_serving, cpu_env, free_port, stop

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "tpu_pod" / "launch.sh"
PROMPT = "def fib(n):"
MAX_TOKENS = 8
SERVE_FLAGS = ["--no-metrics", "--no-http", "--max-model-len", "64", "--max-num-seqs", "2",
               "--max-num-batched-tokens", "32", "--grace", "5", "--no-warmup"]


def _start(n: int, devices: int, flags: list[str], *, grpc_port: int, tmp: Path) -> subprocess.Popen:
    env = cpu_env()  # launch --local-cpu-devices sets the device count per process
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # energon on PATH
    cmd = ["bash", str(SCRIPT), "--local", str(n), "--local-cpu-devices", str(devices),
           "--coordinator-port", str(free_port()), "--", *flags, "--port", str(grpc_port), *SERVE_FLAGS]
    log = open(tmp / "launch.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _ask(proc: subprocess.Popen, port: int, log: Path):
    """Wait until process 0 serves, then one greedy Generate; returns (layout, text)."""
    info, text = ask_when_serving(proc, port, PROMPT, max_tokens=MAX_TOKENS, tries=600, timeout_s=180, log=log)
    return info.layout, text


def _serve_and_ask(model: str, flags: list[str], tmp: Path):
    """2 local workers x 1 CPU device serving ``model`` with ``flags``, asked once, then
    SIGTERM; returns (layout, text, launch.sh's exit code, its log)."""
    port = free_port()
    proc = _start(2, 1, ["--model", model, *flags], grpc_port=port, tmp=tmp)
    try:
        layout, text = _ask(proc, port, tmp / "launch.log")
    finally:
        code = stop(proc)
    return layout, text, code, (tmp / "launch.log").read_text()


@pytest.fixture(scope="module")
def llama(tiny_checkpoint) -> tuple[str, str]:
    """The tiny llama checkpoint and its single-device greedy text (the reference)."""
    from energon_jax import Engine, SamplingParams

    path = str(tiny_checkpoint("llama"))
    engine = Engine.from_pretrained(path, max_model_len=64, warmup=False)
    out = engine.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
    return path, out[0].text


def test_dry_run_local_prints_the_pod_workers_command(tmp_path):
    """--local runs the very string the pod's workers get, with the coordinator on 127.0.0.1."""
    flags = ["--model", "/ckpt/it's a model", "--tp", "2"]
    common = ["--workdir", "~/energon", "--env", "HF_HOME=/data/hf", "--coordinator-port", "9100", "--dry-run"]
    pod = subprocess.run(["bash", str(SCRIPT), "--tpu", "t", "--zone", "z", "--coordinator-ip", "127.0.0.1",
                          *common, "--", *flags], capture_output=True, text=True, timeout=30)
    local = subprocess.run(["bash", str(SCRIPT), "--local", "2", "--local-cpu-devices", "3", *common, "--", *flags],
                           capture_output=True, text=True, timeout=30)
    assert pod.returncode == 0 and local.returncode == 0, (pod.stderr, local.stderr)
    pod_words = shlex.split(pod.stdout.strip().removeprefix("+ "))
    local_words = shlex.split(local.stdout.strip().removeprefix("+ "))
    worker_command = pod_words[pod_words.index("--command") + 1]
    assert local_words == ["energon", "launch", "--num-processes", "2", "--port", "9100",
                           "--cpu-devices-per-process", "3", "--", "bash", "-c", worker_command]
    assert "ENERGON_COORDINATOR_ADDRESS=127.0.0.1:9100" in worker_command


def test_readme_points_only_at_files_that_exist():
    import re

    readme = (SCRIPT.parent / "README.md").read_text()
    paths = re.findall(r"`([\w./-]+\.(?:py|sh|md))`", readme)
    assert "examples/multiprocess_local.py" in paths and "tests/test_tpu_pod_local.py" in paths
    for path in paths:  # relative to the repo, to this folder, or to the package
        assert any((base / path).is_file() for base in (ROOT, SCRIPT.parent, ROOT / "energon_jax")), path


@pytest.mark.parametrize("args, message", [
    (["--local", "2", "--tpu", "t"], "--local runs on this machine: drop --tpu/--zone/--project"),
    (["--local", "2", "--coordinator-ip", "10.0.0.1"], "--local puts the coordinator on 127.0.0.1"),
    (["--local", "two"], "--local=two must be a number of processes"),
    (["--tpu", "t", "--zone", "z", "--local-cpu-devices", "2"], "--local-cpu-devices needs --local N"),
    (["--local", "2", "--local-cpu-devices", "0"], "--local-cpu-devices=0 must be a number >= 1"),
])
def test_local_bad_arguments_say_why(args, message):
    proc = subprocess.run(["bash", str(SCRIPT), *args, "--dry-run"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.timeout(400)
def test_local_two_workers_tp2_answer_a_grpc_request(llama, tmp_path):
    """The smoke test: 2 local workers x 1 CPU device, tp=2 across them, one request."""
    path, expected = llama
    layout, text, code, log = _serve_and_ask(path, ["--tp", "2"], tmp_path)
    assert (layout.dp, layout.pp, layout.tp) == (1, 1, 2)
    assert text == expected
    assert code == 128 + signal.SIGTERM, log[-3000:]  # energon launch's code when it was signalled
    assert "started 2 processes (coordinator 127.0.0.1:" in log and "failed" not in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_two_workers_pp2_answer_a_grpc_request(llama, tmp_path):
    """The issue's rehearsal: 2 local workers x 1 CPU device, one pipeline stage each."""
    path, expected = llama
    layout, text, code, log = _serve_and_ask(path, ["--pp", "2"], tmp_path)
    assert (layout.dp, layout.pp, layout.tp) == (1, 2, 1)
    assert text == expected
    assert code == 128 + signal.SIGTERM, log[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_local_killed_worker_brings_every_process_down_within_30s(llama, tmp_path):
    """SIGKILL one serving worker: launch.sh (energon launch) stops the rest and exits non-zero."""
    path, _ = llama
    port = free_port()
    proc = _start(2, 1, ["--model", path, "--tp", "2"], grpc_port=port, tmp=tmp_path)
    try:
        _ask(proc, port, tmp_path / "launch.log")  # both processes are up and serving
        worker = _serve_pids(proc.pid)[1]
        t0 = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "launch.log").read_text()
    assert elapsed < 30 and code != 0, log[-3000:]
    assert "process 1" in log and "failed" in log, log[-3000:]


def _serve_pids(launcher: int) -> list[int]:
    """The ``energon serve`` processes under ``launcher``, ordered by ENERGON_PROCESS_ID."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"serve" in cmdline and environ.get(b"ENERGON_NUM_PROCESSES") == b"2" and _descends(int(entry.name),
                                                                                              launcher):
            found[int(environ[b"ENERGON_PROCESS_ID"])] = int(entry.name)
    assert sorted(found) == [0, 1], found
    return [found[0], found[1]]


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False
