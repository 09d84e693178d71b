"""benchmarks/host_overhead.py at a tiny size, so the script cannot rot: the identity runner
drives the real step loop (decode rows keep growing, text comes out), the parts are timed,
and the table prints."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("host_overhead", ROOT / "benchmarks" / "host_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_host_overhead_core_runs_on_the_demo_model():
    from energon_jax.engine import demo_model_path

    ho = _load()
    engine = ho.build_engine(demo_model_path(), 4, 256, prompt_len=8, steps=5, warmup=False)
    res = ho.measure_host(engine, 4, prompt_len=8, steps=5, penalty_fraction=0.5)
    assert res.rows == 4 and res.steps == 5 and res.step_ms > 0
    assert set(res.parts_ms) == {"schedule", "pack", "update", "detokenize"}
    assert sum(res.parts_ms.values()) < res.step_ms
    running = engine.scheduler.running
    assert len(running) == 4 and all(len(r.output_token_ids) >= 5 for r in running)
    # the identity: each id is the last fed token + 1 (shifted past the special ids)
    r = running[0]
    ids = [*r.prompt_token_ids, *r.output_token_ids]
    assert all(b == 3 + (a + 1) % (4096 - 3) for a, b in zip(ids[7:-1], ids[8:]))
    assert engine.runner is not engine._loop.runner  # the model never ran
    text = ho.table([(res, None), (res, 1.5)])
    assert text.count("\n") == 3 and "| 4 |" in text and "1.5 |" in text
    assert np.isfinite(res.step_ms)
