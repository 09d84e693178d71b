"""Engine(..., tp=, pp=, dp=, offload=, resident_layers=) through parallel/runtime.py.

In a child with 8 simulated CPU devices the same random 4-layer Llama generates greedily
for 3 prompts with the engine's own scheduler, once per layout: tp 2 and 8 (KV heads
sharded, then replicated), dp 2 x tp 4, pp 2, pp 2 x tp 4 and layer offloading to host
memory; the token ids must equal the single-device engine's. Across processes,
``energon launch`` runs 2 processes x 2 devices with ``tp=4``: process 0 generates, the
worker serves its controller, and the tokens equal the single-device engine's.
Impossible layouts are ValueErrors that say why.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from test_parallel_mesh import ROOT, run_child

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = [[5, 9, 13, 7, 22, 30, 31], [40, 41, 42], [17, 3, 88, 60, 12, 11, 10, 9, 8]]
# Each layout builds and warms up its own engine; the default run keeps three (KV heads
# replicated, pipeline x tensor, offload), the slow run adds the other three.
LAYOUTS = {
    "default": [dict(tp=8), dict(pp=2, tp=4), dict(offload="host", resident_layers=1)],
    "more": [dict(tp=2), dict(dp=2, tp=4), dict(pp=2)],
}


@pytest.mark.parametrize("group", ["default", pytest.param("more", marks=pytest.mark.slow)])
def test_engine_layouts_match_single_device(group):
    out = run_child(__file__, "layouts", group)
    base = out["base"]
    assert len(base) == 3 and all(len(t) == 5 for t in base)
    assert [c["layout"] for c in out["cases"]] == LAYOUTS[group]
    for case in out["cases"]:
        assert case["tokens"] == base, case
        assert case["runner"] == case["expect_runner"], case


def test_engine_tp4_across_two_processes(tmp_path):
    from energon_jax.parallel.launch import LaunchConfig, launch

    base = run_child(__file__, "base", devices=1)["base"]
    path = os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    code = launch([sys.executable, __file__, "multi", str(tmp_path)],
                  LaunchConfig(num_processes=2, cpu_devices_per_process=2, grace_s=10), env=env)
    assert code == 0
    got = json.loads((tmp_path / "0.json").read_text())
    worker = json.loads((tmp_path / "1.json").read_text())
    assert got["tokens"] == base
    assert got["runner"] == worker["runner"] == "Controller"
    assert worker["steps"] == got["steps"] > 0


def test_impossible_layouts_say_why():
    from energon_jax.parallel.runtime import ParallelOptions

    with pytest.raises(ValueError, match=r"tp=0 must be an integer >= 1"):
        ParallelOptions(tp=0)
    with pytest.raises(ValueError, match=r"offload='host' runs on one compute device: dp=1, pp=1, tp=2"):
        ParallelOptions(tp=2, offload="host")
    with pytest.raises(ValueError, match=r"resident_layers=2 needs offload"):
        ParallelOptions(resident_layers=2)
    with pytest.raises(ValueError, match=r"offload='gpu' must be one of"):
        ParallelOptions(offload="gpu")


# ----------------------------------------------------------------- the children


def _engine(**layout):
    from energon_jax.engine import Engine
    from test_parallel_tp_models import build_model

    model, config = build_model("llama", num_hidden_layers=4)
    return Engine(model, config, None, max_model_len=32, page_size=4, kv_cache_pages=32, max_num_seqs=4,
                  max_num_batched_tokens=16, **layout)


def _generate(engine):
    from energon_jax.request import SamplingParams

    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    return [list(map(int, o.token_ids)) for o in engine.generate(PROMPTS, params, use_tqdm=False)]


def _child_base() -> dict:
    return {"base": _generate(_engine())}


def _child_layouts(group: str) -> dict:
    expect = {"pp": "PipelineRunner", "offload": "OffloadedRunner"}
    base = _generate(_engine())
    cases = []
    for layout in LAYOUTS[group]:
        engine = _engine(**layout)
        kind = next((v for k, v in expect.items() if k in layout), "ModelRunner")
        cases.append({"layout": layout, "tokens": _generate(engine), "runner": type(engine.runner).__name__,
                      "expect_runner": kind})
    return {"base": base, "cases": cases}


def _child_multi(outdir: str) -> None:
    from energon_jax.parallel import distributed

    assert distributed.initialize_from_env()
    import jax

    engine = _engine(tp=4)
    controller = engine.runner
    out = {"runner": type(controller).__name__}
    if jax.process_index() == 0:
        try:
            out["tokens"] = _generate(engine)
            out["steps"] = controller.steps
        finally:
            controller.shutdown()
    else:
        out["steps"] = controller.serve()
    with open(os.path.join(outdir, f"{jax.process_index()}.json"), "w") as f:
        json.dump(out, f)
    distributed.shutdown()


if __name__ == "__main__":
    sys.path[:0] = [ROOT, HERE]
    mode = sys.argv[1]
    if mode == "multi":
        _child_multi(sys.argv[2])
    elif mode == "layouts":
        print(json.dumps(_child_layouts(sys.argv[2])))
    else:
        print(json.dumps(_child_base()))
