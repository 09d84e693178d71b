"""parallel/pipeline.py: non-blocking pipeline parallelism on 8 simulated CPU devices.

``PipelineRunner`` (one jitted call per stage, activations copied between stages) is no
longer what ``Engine(pp=N)`` runs: the engine runs the pipeline as one SPMD program
(``spmd_pipeline.py``, tested in ``test_spmd_pipeline.py``), and this runner stays as the
reference it is checked against. A 4-layer Llama generates greedily for staggered
prompts (chunked prefill, then decode, one request aborted in flight) through
``PipelineStepLoop`` driving the ``PipelineRunner`` clock; the tokens must be identical to
one device running the plain engine (pp=1). The instrumentation must show ``pp``
micro-batches in flight at once and every stage busy, the layers split into contiguous
ranges, and each stage's KV pages on its own devices (split by KV head over ``tp``).
Default run: pp=4 and pp=2 x tp=4; the slow run adds pp=2.
"""

from __future__ import annotations

import json
import sys

import pytest

from test_parallel_mesh import ROOT, run_child

LAYERS = 4
CASES = {"default": [(4, 1), (2, 4)], "more": [(2, 1)]}


# Both groups slow (15 min budget): test_parallel_engine checks pp=2 and pp=2 x tp=4 tokens by default.
@pytest.mark.parametrize("group", [pytest.param("default", marks=pytest.mark.slow),
                                   pytest.param("more", marks=pytest.mark.slow)])
def test_pipeline_matches_single_device(group):
    from test_spmd_pipeline import _check

    out = run_child(__file__, "run", group)
    assert [(c["pp"], c["tp"]) for c in out["cases"]] == CASES[group]
    _check(out)  # tokens (the aborted request's a prefix), pages back, pp in flight, every stage busy
    for case in out["cases"]:
        assert case["bounds"] == [[i * LAYERS // case["pp"], (i + 1) * LAYERS // case["pp"]]
                                  for i in range(case["pp"])], case
        # each stage's KV pages live only on that stage's devices, split by KV head over tp
        assert case["kv_devices_disjoint"], case
        assert case["kv_shard_heads"] == (2 // case["tp"] if case["tp"] <= 2 else 2), case


def test_layer_bounds_and_errors():
    from energon_jax.parallel.stages import layer_bounds

    assert layer_bounds(5, 2) == [(0, 3), (3, 5)]
    assert layer_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match=r"pp=3 must be in \[1, num_layers=2\]"):
        layer_bounds(2, 3)


# ----------------------------------------------------------------- host only: start / finish


class EchoPipeline:
    """``PipelineRunner``'s clock over ``test_scheduler.PagedEcho`` (a fake model reading its
    context back from the pages): a micro-batch leaves ``pp - 1`` ticks after it entered,
    and its ids are fetched only by ``handle.result()``. ``log`` records ticks and fetches."""

    def __init__(self, pp: int, model, log: list, name: str = "") -> None:
        self.pp, self.model, self.log, self.name = pp, model, log, name
        self._slots: list = [None] * pp  # (tag, handle) per stage
        self.max_in_flight = 0

    @property
    def empty(self) -> bool:
        return all(slot is None for slot in self._slots)

    @property
    def in_flight_tags(self) -> list:
        return [slot[0] for slot in reversed(self._slots) if slot is not None]

    def tick(self, batch=None, tag=None):
        self.log.append(("tick", self.name))
        if batch is not None:
            self._slots[0] = (tag, _EchoHandle(self.model.step(batch, tag), self.log, self.name))
        self.max_in_flight = max(self.max_in_flight, sum(slot is not None for slot in self._slots))
        out, self._slots = self._slots[-1], [None, *self._slots[:-1]]
        return out


class _EchoHandle:
    def __init__(self, sampled, log: list, name: str) -> None:
        self._sampled, self._log, self._name = sampled, log, name

    def result(self):
        self._log.append(("result", self._name))
        return self._sampled


def echo_requests(rng, n: int, vocab: int) -> list:
    """``n`` greedy requests of random lengths, each with the tick it arrives at."""
    from energon_jax.request import Request, SamplingParams

    return [(Request(f"r{i}", [rng.randrange(5, vocab) for _ in range(rng.randint(1, 12))],
                     SamplingParams(max_tokens=rng.randint(1, 8), temperature=0.0, ignore_eos=True)),
             rng.randrange(8)) for i in range(n)]


@pytest.mark.parametrize("pp", [2, 3])
def test_pipeline_step_loop_start_dispatches_finish_collects(pp):
    """``start`` plans and ticks without fetching anything; ``finish`` fetches at most the one
    micro-batch that left; driven that way every request gets the fake model's reference
    tokens (in deltas and on the request), pp micro-batches were in flight, pages came back."""
    import random

    from energon_jax.parallel.pipeline import PipelineStepLoop
    from energon_jax.scheduler import SchedulerConfig
    from test_scheduler import VOCAB, make, reference

    rng = random.Random(pp)
    cfg = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16, max_model_len=40, page_size=4, num_pages=40)
    sched, buckets, model = make(cfg)
    log: list = []
    runner = EchoPipeline(pp, model, log)
    loop = PipelineStepLoop(sched, runner, buckets, lambda deltas: list(deltas))
    requests = echo_requests(rng, 10, VOCAB)
    got: dict[str, list[int]] = {r.request_id: [] for r, _ in requests}
    tick = 0
    while tick < 8 or sched.has_work() or not runner.empty:
        for r, arrive in requests:
            if arrive == tick:
                sched.add(r)
        live = {r.request_id for r, arrive in requests if arrive <= tick and not r.finished}
        n = len(log)
        deltas = loop.start(live)
        assert all(kind == "tick" for kind, _ in log[n:]), log[n:]  # start never waits on the device
        n = len(log)
        deltas += loop.finish()
        assert [kind for kind, _ in log[n:]] in ([], ["result"]), log[n:]  # at most the one that left
        for d in deltas:
            got[d.request.request_id].extend(d.new_token_ids)
        tick += 1
        assert tick < 500
    assert loop.finish() == [] and not loop.busy() and not loop.on_device
    assert runner.max_in_flight == pp
    assert sched.pages_used == 0 and sched.allocator.num_free == cfg.num_pages - 1
    for r, _ in requests:
        want, reason = reference(r.prompt_token_ids, r.params)
        assert (r.output_token_ids, r.finish_reason) == (want, reason)
        assert got[r.request_id] == want


# ----------------------------------------------------------------- the child


def _child(group: str) -> dict:
    import jax.numpy as jnp

    from energon_jax.parallel.mesh import make_mesh, sharding_rules
    from energon_jax.parallel.options import ParallelOptions
    from energon_jax.parallel.pipeline import PipelineRunner
    from energon_jax.parallel.stages import decoder_parts
    from test_parallel_tp_models import build_model
    from test_spmd_pipeline import ENGINE, _buckets, drive, reference

    want = reference(LAYERS)  # one device, the plain engine
    cases = []
    for pp, tp in CASES[group]:
        model, config = build_model("llama", num_hidden_layers=LAYERS)
        mesh = make_mesh(ParallelOptions(pp=pp, tp=tp))
        runner = PipelineRunner(decoder_parts(model), mesh, sharding_rules(tp, num_kv_heads=config.num_kv_heads),
                                num_pages=ENGINE["kv_cache_pages"], page_size=ENGINE["page_size"],
                                kv_dtype=jnp.float32)
        case = drive(runner, _buckets(), num_pages=ENGINE["kv_cache_pages"])
        devs = [{d.id for pages in stage for d in pages.k.devices()} for stage in runner.kv]
        case.update(pp=pp, tp=tp, name=f"per_stage_pp{pp}_tp{tp}", reference=want,
                    bounds=[list(b) for b in runner.bounds],
                    kv_devices_disjoint=all(not (devs[a] & devs[b]) for a in range(pp) for b in range(a + 1, pp)),
                    kv_shard_heads=int(runner.kv[0][0].k.addressable_shards[0].data.shape[2]))
        cases.append(case)
    return {"cases": cases}


if __name__ == "__main__":
    sys.path[:0] = [ROOT]
    print(json.dumps(_child(sys.argv[2])))
