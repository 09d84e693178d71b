"""parallel/runtime.py: one frozen ParallelOptions in, one Executor out, its parts typed by
the Protocols of energon_jax/protocols.py (host-only and one-device checks; the layouts
themselves are run in test_parallel_engine.py, test_parallel_dp.py and the launch tests)."""

from __future__ import annotations

import re

import pytest

from energon_jax.parallel.options import ParallelOptions
from energon_jax.protocols import CompiledRunner, EngineLoop, SchedulerView, StepRunner


def test_options_are_built_once_from_the_shorthand():
    kwargs = {"tp": 2, "dp": 2, "offload": None, "max_num_seqs": 4}
    assert ParallelOptions.take(kwargs) == ParallelOptions(dp=2, tp=2) and kwargs == {"max_num_seqs": 4}
    given = ParallelOptions(pp=2)
    assert ParallelOptions.resolve(given) is given
    assert ParallelOptions.resolve(None, tp=2) == ParallelOptions(tp=2)
    with pytest.raises(ValueError, match=re.escape("give parallel=ParallelOptions(dp=1, pp=2")):
        ParallelOptions.resolve(given, tp=2)
    assert ParallelOptions(dp=2, pp=3, tp=4).shape == (2, 3, 4) and ParallelOptions().single_device
    with pytest.raises(ValueError, match=r"expert_parallel='yes' must be a bool"):
        ParallelOptions(tp=2, expert_parallel="yes")


def test_load_sharding_reads_the_options():
    from energon_jax.parallel.runtime import load_sharding

    config = type("C", (), dict(is_encoder=False, num_heads=4, num_kv_heads=2, num_layers=2))()
    # Only tp loads into shards; pipeline and offload runners place the layers themselves.
    assert load_sharding(config, ParallelOptions()) is None
    assert load_sharding(config, ParallelOptions(pp=2, tp=2)) is None
    with pytest.raises(ValueError, match=r"tp=3 must divide num_heads=4"):  # before any weight is read
        load_sharding(config, ParallelOptions(tp=3))


def test_host_views_meet_the_protocols():
    from energon_jax.parallel.data_parallel import DataParallelRunner, DataParallelScheduler
    from energon_jax.scheduler import Scheduler, SchedulerConfig

    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=16, page_size=4, num_pages=9)
    assert isinstance(Scheduler(cfg), SchedulerView)
    assert isinstance(DataParallelScheduler([Scheduler(cfg), Scheduler(cfg)]), SchedulerView)

    class Compiles:
        num_compiles = 0

        def warmup(self, batches) -> int:
            return 0

    group = DataParallelRunner([Compiles(), Compiles()])
    assert isinstance(group, CompiledRunner) and not isinstance(group, StepRunner)  # no step of its own


def test_single_device_executor():
    """Nothing asked: a plain ModelRunner that keeps penalty counts on the device, a Scheduler,
    a StepLoop that plans ahead; the Engine holds exactly these."""
    from energon_jax.engine import Engine
    from energon_jax.runner import ModelRunner
    from energon_jax.scheduler import Scheduler
    from energon_jax.step_loop import StepLoop
    from tiny_decoder import TinyConfig, TinyDecoder

    config = TinyConfig(num_layers=1, max_position_embeddings=32)
    engine = Engine(TinyDecoder(config, seed=1), config, None, max_model_len=32, page_size=4, kv_cache_pages=9,
                    max_num_seqs=2, max_num_batched_tokens=8, warmup=False)
    assert engine.parallel == ParallelOptions()
    assert type(engine.runner) is ModelRunner and engine.runner.penalty_tables is not None
    assert isinstance(engine.runner, StepRunner)
    assert type(engine.scheduler) is Scheduler and isinstance(engine.scheduler, SchedulerView)
    assert type(engine._loop) is StepLoop and isinstance(engine._loop, EngineLoop)
    assert engine.async_scheduling and engine.overlap.startswith("plans ahead")
