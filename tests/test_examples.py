"""The examples run end to end on the embedded demo model (small max_tokens, bounded in time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_generate_example_batched_equals_streamed():
    from energon_jax.engine import Engine
    from energon_jax.request import SamplingParams

    proc = _run("generate.py", "--max-tokens", "6", timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The example's first completion, checked against the engine run here (same greedy tokens).
    engine = Engine.from_pretrained(None, max_model_len=256, max_num_seqs=1, max_num_batched_tokens=64, warmup=False)
    ref = engine.generate("def add(a, b):", SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert len(ref.token_ids) == 6
    assert "def add(a, b):" + ref.text + "\n" in proc.stdout
    assert proc.stdout.count("def add(a, b):" + ref.text) == 2  # batched and streamed


@pytest.mark.timeout(300)
def test_serve_and_query_example_streams_and_exits_cleanly():
    proc = _run("serve_and_query.py", "--max-tokens", "5", "--prompt", "import os", "--startup-timeout", "240",
                timeout=290)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "[finish_reason=length, completion tokens=5]" in proc.stdout
    assert "server exited with code 0" in proc.stdout
