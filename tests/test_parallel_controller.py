"""parallel/controller.py: process 0 schedules and broadcasts each step; every process computes.

The real thing, end to end: ``energon launch`` starts 2 processes x 2 CPU devices; both
build the same Llama, shard it with ``tp=4`` over the 4 devices of both processes, and
wrap their ``ModelRunner`` in a ``Controller``. Process 0 runs the scheduler (greedy,
continuous batching of 3 prompts, chunked prefill) and broadcasts every packed batch;
process 1 runs ``serve()`` until process 0 shuts it down. The tokens must equal those
of one process on one device running the same scheduler loop without a controller,
and both processes must exit 0 (a normal shutdown ends all processes).

Also: in one process the controller is the runner (no broadcast), a worker cannot
step, and a batch of an unknown shape is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from test_parallel_mesh import ROOT, run_child
from energon_jax.parallel.options import ParallelOptions

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = [[5, 9, 13, 7, 22, 30, 31], [40, 41, 42], [17, 3, 88, 60, 12, 11, 10, 9, 8, 7, 6]]
MAX_TOKENS = 6


def _launch_env() -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    return env


def test_two_processes_tp4_match_one_process(tmp_path):
    from energon_jax.parallel.launch import LaunchConfig, launch

    want = run_child(__file__, "single", str(tmp_path), devices=1)
    code = launch([sys.executable, __file__, "multi", str(tmp_path)],
                  LaunchConfig(num_processes=2, cpu_devices_per_process=2, grace_s=10), env=_launch_env())
    assert code == 0
    got = json.loads((tmp_path / "multi-0.json").read_text())
    worker = json.loads((tmp_path / "multi-1.json").read_text())
    assert got["device_count"] == 4 and got["process_count"] == 2
    assert got["tokens"] == want["tokens"]
    assert all(len(t) == MAX_TOKENS for t in got["tokens"].values())
    assert worker["steps"] == got["steps"] > 0  # the worker ran every step process 0 planned
    # Process 0 planned and broadcast step N+1 before fetching step N's ids; its one blocking
    # sync per step is that fetch. A worker makes no device sync: it waits for each header (and
    # the stop) in the key-value store; process 0 waits for none.
    assert got["planned_ahead"] > 0
    assert got["stats"]["fetch_syncs"] == got["steps"] and got["stats"]["kv_waits"] == 0
    # ... and for the header of each load (joining rows' page tables), which it also receives
    assert worker["stats"]["loads"] == got["stats"]["loads"] > 0
    assert worker["stats"]["kv_waits"] == worker["steps"] + worker["stats"]["loads"] + 1
    assert worker["stats"]["fetch_syncs"] == 0
    assert got["live_header_keys"] <= 2, got  # the headers every worker has read are deleted


def test_single_process_controller_is_the_runner():
    from energon_jax.parallel.controller import Controller

    class FakeRunner:
        kv_cache = ()
        num_compiles = 0
        compiled_shapes: list = []

        def __init__(self):
            self.seen = []

        def step_async(self, batch):
            self.seen.append(batch)
            return Handle()

    class Handle:
        ids_buffer = "ids on device"

        def result(self):
            return "ids"

    runner = FakeRunner()
    c = Controller(runner, [np.zeros(4, np.int32), np.zeros(8, np.int32)], process_index=0, process_count=1)
    handle = c.step_async(np.ones(4, np.int32))
    assert len(runner.seen) == 1 and handle.ids_buffer == "ids on device"
    assert c.stats.fetch_syncs == 0 and handle.result() == "ids" and c.stats.fetch_syncs == 1  # counted when fetched
    assert c.stats.steps == 1 and c.stats.device_syncs == 1 and c.stats.broadcast_s == 0.0  # nothing broadcast
    assert c.stats.kv_waits == 0
    worker = Controller(runner, [np.zeros(4, np.int32)], process_index=1, process_count=2)
    with pytest.raises(RuntimeError, match=r"process 1 is a worker"):
        worker.step_async(np.zeros(4, np.int32))
    boss = Controller(runner, [np.zeros(4, np.int32)], process_index=0, process_count=2)
    with pytest.raises(ValueError, match=r"batch shape is not one of the templates"):
        boss.step_async(np.zeros(5, np.int32))
    with pytest.raises(ValueError, match=r"templates is empty"):
        Controller(runner, [], process_index=0, process_count=1)


class FakeStore:
    """The key-value store's methods over a dict; a missing key times out as jax's does."""

    def __init__(self):
        self.data: dict[str, str] = {}
        self.timeouts = 0

    def key_value_set(self, key, value, allow_overwrite=False):
        assert allow_overwrite or key not in self.data, key
        self.data[key] = value

    def key_value_delete(self, key):  # a key, or a directory with every key under it
        for k in [k for k in self.data if k == key or k.startswith(key + "/")]:
            del self.data[k]

    def key_value_increment(self, key, increment):
        self.data[key] = str(int(self.data.get(key, "0")) + increment)
        return int(self.data[key])

    def blocking_key_value_get(self, key, timeout_in_ms):
        if key not in self.data:
            self.timeouts += 1
            raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
        return self.data[key]


def test_header_channel_numbers_steps_and_deletes_what_every_worker_read():
    from energon_jax.parallel.controller import STEP, STOP, HeaderChannel

    store = FakeStore()
    boss, worker = HeaderChannel(store, process_index=0), HeaderChannel(store, process_index=1)
    steps = [(STEP, i % 3, i % 2 == 1) for i in range(40)]
    for n, (cmd, shape, prev) in enumerate(steps):
        assert boss.publish(cmd, shape, prev) == n
        assert worker.receive() == (cmd, shape, prev)
        if n >= 1:
            boss.acked(n - 1)  # planning ahead: step n - 1's ids fetched after step n went out
        assert boss.live_keys <= 3  # a ring, not a log
    boss.publish(STOP, 0, False)
    assert worker.receive()[0] == STOP
    # The next controller (the next engine of the same run) numbers itself 2 on both sides;
    # once its first step's ids are fetched, generation 1's leftovers are gone.
    boss2, worker2 = HeaderChannel(store, process_index=0), HeaderChannel(store, process_index=1)
    boss2.publish(STEP, 1, False)
    assert worker2.receive() == (STEP, 1, False) and worker2.generation == boss2.generation == 2
    boss2.acked(0)
    boss2.publish(STEP, 2, False)
    headers = sorted(k for k in store.data if k.split("/")[2].isdigit())
    assert headers == ["energon/controller/2/1"], headers
    # A worker waiting for a header retries on the store's timeout (an idle server) ...
    idle = HeaderChannel(store, process_index=1)
    idle._gen, idle._next = 2, 2
    store.timeouts = 0
    calls = iter([RuntimeError("DEADLINE_EXCEEDED: timed out")] * 2)
    real_get = store.blocking_key_value_get

    def slow_get(key, timeout_in_ms):
        err = next(calls, None)
        if err is not None:
            raise err
        return real_get(key, timeout_in_ms)

    store.blocking_key_value_get = slow_get
    boss2.publish(STEP, 0, True)
    assert idle.receive() == (STEP, 0, True)
    # ... but any other error (the coordinator gone) is raised, and a header out of order too.
    store.blocking_key_value_get = lambda key, ms: (_ for _ in ()).throw(RuntimeError("UNAVAILABLE: gone"))
    with pytest.raises(RuntimeError, match="UNAVAILABLE"):
        idle.receive()
    store.blocking_key_value_get = real_get
    store.data["energon/controller/2/3"] = "1 0 0 7"
    with pytest.raises(RuntimeError, match="holds step 7, expected 3"):
        idle.receive()


# ----------------------------------------------------------------- the children


def generate(runner, buckets) -> tuple[dict, int]:
    """A minimal engine loop: greedy continuous batching of PROMPTS through ``runner``."""
    from energon_jax.batch import pack
    from energon_jax.request import Request, SamplingParams
    from energon_jax.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=32,
                                      page_size=4, num_pages=24))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        sched.add(Request(request_id=f"r{i}", prompt_token_ids=p, params=params))
    tokens = {f"r{i}": [] for i in range(len(PROMPTS))}
    steps = 0
    while sched.has_work():
        plan = sched.schedule()
        if plan is None:
            break
        sampled = runner.step(pack(plan, buckets))
        steps += 1
        for delta in sched.update(plan, sampled):
            tokens[delta.request.request_id].extend(int(t) for t in delta.new_token_ids)
    return tokens, steps


def generate_ahead(runner, buckets) -> tuple[dict, int]:
    """``generate`` through the engine's own StepLoop, planning step N+1 before fetching N."""
    from energon_jax.request import Request, SamplingParams
    from energon_jax.scheduler import Scheduler, SchedulerConfig
    from energon_jax.step_loop import StepLoop

    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=32,
                                      page_size=4, num_pages=24))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        sched.add(Request(request_id=f"r{i}", prompt_token_ids=p, params=params))
    loop = StepLoop(sched, runner, buckets, lambda ds: list(ds), plans_ahead=True)
    tokens = {f"r{i}": [] for i in range(len(PROMPTS))}
    while sched.has_work() or loop.busy() or loop.on_device:
        for delta in loop.step(set()):
            tokens[delta.request.request_id].extend(int(t) for t in delta.new_token_ids)
    return tokens, loop.num_planned_ahead


def _setup(tp: int, page_slots: int = 0):
    """The model over tp devices; ``page_slots``: the runner keeps the page tables on the
    device (a batch carries only its rows' slots and new pages; joins are loads)."""
    import jax.numpy as jnp

    from energon_jax.batch import Buckets, warmup_batches
    from energon_jax.parallel.mesh import kv_pages_sharding, make_mesh, shard_model, sharding_rules
    from energon_jax.runner import ModelRunner
    from pallas_kernels import make_kv_pages
    from test_parallel_tp_models import build_model

    model, config = build_model("llama")
    mesh = make_mesh(ParallelOptions(tp=tp))
    rules = sharding_rules(tp, num_kv_heads=config.num_kv_heads)
    shard_model(model, mesh, rules)
    kv = tuple(make_kv_pages(24, 4, config.num_kv_heads, config.head_dim, jnp.float32,
                             sharding=kv_pages_sharding(mesh, rules)) for _ in range(config.num_layers))
    buckets = Buckets.create(max_num_batched_tokens=8, max_num_seqs=4, max_model_len=32, page_size=4, min_tokens=4,
                             page_slots=page_slots)
    runner = ModelRunner(model, kv, page_slots=page_slots, max_pages_per_row=buckets.max_pages_per_row)
    return runner, buckets, warmup_batches(buckets)


def _child_single(outdir: str) -> dict:
    runner, buckets, _ = _setup(tp=1)
    tokens, steps = generate(runner, buckets)
    return {"tokens": tokens, "steps": steps}


def _child_multi(outdir: str) -> None:
    from energon_jax.parallel import distributed
    from energon_jax.parallel.controller import Controller

    assert distributed.initialize_from_env()
    import jax

    runner, buckets, templates = _setup(tp=4, page_slots=8)
    controller = Controller(runner, templates)
    controller.warmup(templates)
    out = {"device_count": jax.device_count(), "process_count": jax.process_count()}
    if controller.is_controller:
        try:
            out["tokens"], out["planned_ahead"] = generate_ahead(controller, buckets)
            out["steps"] = controller.steps
            out["live_header_keys"] = controller.headers.live_keys
        finally:
            controller.shutdown()
    else:
        out["steps"] = controller.serve()
    out["stats"] = dataclasses.asdict(controller.stats)
    with open(os.path.join(outdir, f"multi-{jax.process_index()}.json"), "w") as f:
        json.dump(out, f)
    distributed.shutdown()


if __name__ == "__main__":
    sys.path[:0] = [ROOT, HERE]
    mode, outdir = sys.argv[1], sys.argv[2]
    if mode == "single":
        print(json.dumps(_child_single(outdir)))
    else:
        _child_multi(outdir)
