"""parallel/pipeline.py: non-blocking pipeline parallelism on 8 simulated CPU devices.

A 4-layer Llama generates greedily for 6 prompts (chunked prefill, then decode; more
prompts than ``max_num_seqs``) through ``Engine(pp=N).generate``, which drives the
``PipelineRunner`` clock with ``PipelineStepLoop``; the tokens must be identical to one
device running the plain engine (pp=1). The instrumentation must show ``pp``
micro-batches in flight at once and every stage busy, the layers split into contiguous
ranges, and each stage's KV pages on its own devices (split by KV head over ``tp``).
Default run: pp=4 and pp=2 x tp=4; the slow run adds pp=2.
"""

from __future__ import annotations

import json
import sys

import pytest

from test_parallel_mesh import ROOT, run_child

PROMPTS = [[5, 9, 13, 7, 22, 30, 31], [40, 41, 42], [17, 3, 88, 60, 12, 11, 10, 9, 8],
           [4, 4, 4], [70, 71, 72, 73, 74], [33]]
MAX_TOKENS = 5
LAYERS = 4
CASES = {"default": [(4, 1), (2, 4)], "more": [(2, 1)]}


# Both groups slow (15 min budget): test_parallel_engine checks pp=2 and pp=2 x tp=4 tokens by default.
@pytest.mark.parametrize("group", [pytest.param("default", marks=pytest.mark.slow),
                                   pytest.param("more", marks=pytest.mark.slow)])
def test_pipeline_matches_single_device(group):
    out = run_child(__file__, "run", group)
    want = out["reference"]
    assert len(want) == len(PROMPTS) and all(len(t) == MAX_TOKENS for t in want)
    assert [(c["pp"], c["tp"]) for c in out["cases"]] == CASES[group]
    for case in out["cases"]:
        assert case["tokens"] == want, case
        assert case["max_in_flight"] == case["pp"], case  # stage 0 fed while earlier micro-batches were inside
        assert case["entered"] == case["completed"] > 0, case
        assert all(b > 0 for b in case["busy"]), case
        assert case["ticks"] > 0 and case["pages_used"] == 0, case
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


def _engine(**layout):
    from energon_jax.engine import Engine
    from test_parallel_tp_models import build_model

    model, config = build_model("llama", num_hidden_layers=LAYERS)
    return Engine(model, config, None, max_model_len=32, page_size=4, kv_cache_pages=40, max_num_seqs=4,
                  max_num_batched_tokens=8, min_token_bucket=4, **layout)


def _child(group: str) -> dict:
    from energon_jax.request import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

    def tokens(engine):
        return [list(map(int, o.token_ids)) for o in engine.generate(PROMPTS, params, use_tqdm=False)]

    reference = tokens(_engine())  # one device, the plain runner
    cases = []
    for pp, tp in CASES[group]:
        engine = _engine(pp=pp, tp=tp)
        got = tokens(engine)
        runner, st = engine.runner, engine.runner.stats  # counters since warm-up: this generate
        devs = [{d.id for pages in stage for d in pages.k.devices()} for stage in runner.kv]
        disjoint = all(not (devs[a] & devs[b]) for a in range(pp) for b in range(a + 1, pp))
        cases.append({
            "pp": pp, "tp": tp, "tokens": got, "max_in_flight": st.max_in_flight, "busy": st.busy,
            "ticks": st.ticks, "entered": st.entered, "completed": st.completed,
            "pages_used": engine.scheduler.pages_used,
            "bounds": [list(b) for b in runner.bounds], "kv_devices_disjoint": disjoint,
            "kv_shard_heads": int(runner.kv[0][0].k.addressable_shards[0].data.shape[2]),
        })
    return {"reference": reference, "cases": cases}


if __name__ == "__main__":
    sys.path[:0] = [ROOT]
    print(json.dumps(_child(sys.argv[2])))
