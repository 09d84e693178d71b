"""``energon launch -n 2 -- generate --tp 2``: one distributed run, same text as one process.

Two processes with one simulated CPU device each: the tiny llama checkpoint is sharded over
both (tp=2); process 0 prints, the worker runs its steps and prints nothing. The greedy text
must equal the single-process, single-device run's, and appear once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def _energon(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device per process unless launch says otherwise
    return subprocess.run([sys.executable, "-m", "energon_jax.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("devices_per_process", [1, 2])
def test_launch_generate_tp2_matches_single_process(tiny_checkpoint, devices_per_process):
    path = str(tiny_checkpoint("llama"))
    prompt = "def fib(n):"
    gen = ["generate", "--model", path, prompt, "--max-tokens", "10", "--temperature", "0", "--seed", "3"]
    single = _energon(*gen, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    assert single.stdout.startswith(prompt) and len(single.stdout) > len(prompt) + 1

    # Across processes the mesh must use every device: 2 x 1 devices = tp 2; 2 x 2 = dp 2 x tp 2.
    extra = ["--tp", "2"] if devices_per_process == 1 else ["--tp", "2", "--dp", "2"]
    multi = _energon("launch", "-n", "2", "--cpu-devices-per-process", str(devices_per_process), "--",
                     *gen, *extra, timeout=240)
    assert multi.returncode == 0, multi.stderr[-3000:]
    # gloo's C++ side prints its connection lines to stdout (possibly mid-line, since a
    # collective connects lazily); everything else is process 0's text.
    text = re.sub(r"\[Gloo\][^\n]*\n", "", multi.stdout)
    assert text == single.stdout  # printed once, by process 0, same greedy text
