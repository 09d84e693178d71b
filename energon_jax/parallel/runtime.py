"""The one place a parallel layout becomes an executor: runner, scheduler (view), step loop.

``Engine`` hands one frozen ``ParallelOptions`` (``options.py``) and its sizes to
``build_executor`` and gets back an ``Executor`` whose parts meet the ``Protocol``\\ s of
``energon_jax/protocols.py``; the engine keeps only request bookkeeping. The layouts,
one branch each in ``build_runner`` (the runner) and ``_loop_for`` (how it is driven):

- nothing asked, one process: a plain ``ModelRunner`` on the default device. It, and
  every runner below, in one process or across processes, keeps the penalty counts and
  the page tables on the device (``device_penalties``, ``device_page_tables``): a batch
  carries the step's deltas, and whole rows go up only for requests that join
  (``slot_loads.py``; across processes broadcast by the ``Controller``);
- ``tp``: the model sharded over a ``(1, 1, tp)`` mesh by its logical axes, KV pages
  split by KV head (``mesh.py``), one ``ModelRunner`` over all of it; with
  ``expert_parallel`` a mixture-of-experts model spreads whole experts over ``tp``;
- ``dp > 1`` in one process: a ``DataParallelRunner`` (``data_parallel.py``): ``dp``
  independent replicas, replica ``r`` on the sub-mesh ``mesh[r, :, :]`` with its own
  weights and KV pool (a ``ModelRunner``, or an ``SpmdPipelineRunner`` when ``pp > 1``), each
  with its own ``Scheduler`` and step loop behind ``DataParallelScheduler`` and
  ``DataParallelStepLoop``. Across processes (``pp = 1``) the replicas share one jitted
  step over the ``(dp, 1, tp)`` mesh (``replica_step.py``): each replica's batch is a
  slice of a stacked batch sharded over ``dp``, its pages a slice of a ``[dp, ...]`` pool
  on its own devices, the same schedulers and step loops filling them;
- ``pp > 1``: an ``SpmdPipelineRunner`` (``spmd_pipeline.py``: layers stacked over the
  ``pp`` axis, one jitted tick for all stages) driven by ``PipelineStepLoop`` (``pp``
  micro-batches in flight), in one process or across processes (``PipelineController``
  broadcasts each tick's new micro-batch); ``dp x pp`` across processes: every replica's
  pipeline in one jitted tick with a leading ``dp`` axis on its carry
  (``replica_pipeline.py``), each replica's clock, scheduler and step loop on process 0;
- ``offload``: an ``OffloadedRunner`` (``resident_layers`` on device, the rest streamed);
- more than one process: whatever the above gave, wrapped in a ``Controller`` so that
  process 0's steps are broadcast and every process runs them (workers call
  ``controller.serve()``).

A new layout is one branch in ``build_runner`` and, if it needs its own clock, one in
``_loop_for``. The model is validated against the layout first, so an impossible
configuration is a ``ValueError`` that says why before anything is placed.
``load_sharding`` reads the same options to load a tensor-parallel checkpoint straight
into its shards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax

from energon_jax.parallel.mesh import (
    kv_pages_sharding, make_mesh, param_sharding_fn, placed_copy, replica_meshes, shard_model, sharding_rules,
    validate_model_parallelism,
)
from energon_jax.parallel.options import ParallelOptions
from energon_jax.protocols import CompiledRunner, EngineLoop, SchedulerView, StepRunner

if TYPE_CHECKING:
    from energon_jax.scheduler import Scheduler

log = logging.getLogger(__name__)

__all__ = [
    "Executor", "ParallelOptions", "build_executor", "build_runner", "dp_replicas", "load_sharding",
    "sized_executor", "warm_up_with_progress",
]

# Row buckets per token bucket (batch.Buckets.row_split): from 64 rows, also 1/8 and 1/64 of
# the full one (>= 4 rows). Defaults (32 seqs, 512 tokens): 9 step shapes as before; 256
# seqs, 2048 tokens: 31 instead of 13, and a one-row prefill chunk samples 4 rows, not 256.
ROW_SPLIT = 8


@dataclasses.dataclass(frozen=True)
class Executor:
    """What runs the engine's steps, built by ``build_executor``."""

    runner: CompiledRunner
    scheduler: SchedulerView
    loop: EngineLoop
    buckets: Any  # batch.Buckets: the step shapes every part was built for
    async_scheduling: bool  # whether the loop really plans step N+1 before N's ids are fetched
    overlap: str  # why (or why not), in words


def device_penalties(options: ParallelOptions) -> bool:
    """Whether the runners keep penalty counts on the device (``sampling.PenaltyTables``): every
    layout does (one device, tp, dp replicas, the pipeline, offloading; across processes tp,
    pp x tp and the stacked dp replicas, whose tables carry a leading ``[dp]`` axis). Every
    process updates its copy in the same step; a slot rebuilt on the host goes to every
    process in a broadcast load before its step (``Controller.write_penalty_rows``). The
    switch stays for tests, which compare against batches that carry each row's history."""
    del options
    return True


def device_page_tables(options: ParallelOptions, attention_window: int | None) -> bool:
    """Whether the runner keeps the page tables on the device (``Buckets.page_slots``): every
    layout does, with or without a sliding window (``HostRows`` sends the pages it releases as
    null entries); across processes a joining row's table goes to every process in a broadcast
    load before its step (``Controller.write_page_rows``). The switch stays for tests, which
    compare against batches that carry ``[B, M]`` tables."""
    del options, attention_window
    return True


def sized_executor(
    model: Any,
    model_config: Any,
    build: Callable[[Any], Executor],
    *,
    memory_fraction: float,
    max_model_len: int | None,
    page_size: int,
    kv_cache_pages: int | None,
    kv_cache_bytes: int | None,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    static_batching: bool,
) -> tuple[Any, Executor]:
    """The engine's sizes (an ``EngineConfig``) and ``build(sizes)``, its executor.

    On an accelerator with no pool size given, the pool is sized from device memory
    (``memory_sizing.py``): an executor with room for one sequence is built and profiled on
    the largest step shape, dropped, and the real one built with the pages memory allows."""
    from energon_jax.engine_config import check_pool_holds_one_sequence, engine_config, param_dtype
    from energon_jax.memory_sizing import describe_pool, memory_stats, pool_pages_from_memory

    sized_by_memory = (
        kv_cache_pages is None and kv_cache_bytes is None and jax.process_count() == 1
        and memory_stats(jax.devices()[0]) is not None
    )
    if sized_by_memory:
        kv_cache_pages = 1 + -(-(max_model_len or model_config.max_position_embeddings) // page_size)
    config = engine_config(
        model_config, max_model_len=max_model_len, page_size=page_size, kv_cache_pages=kv_cache_pages,
        kv_cache_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        static_batching=static_batching, kv_dtype=param_dtype(model),
    )
    if sized_by_memory:
        provisional = build(config)
        num_pages = pool_pages_from_memory(provisional.runner, provisional.buckets, config.num_pages, memory_fraction)
        del provisional  # drop the provisional pool before the real one
        check_pool_holds_one_sequence(num_pages, config.page_size, config.max_model_len,
                                      window=getattr(model_config, "kv_window", None),
                                      max_num_batched_tokens=config.max_num_batched_tokens)
        config = dataclasses.replace(config, num_pages=num_pages)
    log.info("KV pool (%s): %s", "sized from device memory" if sized_by_memory else "explicit",
             describe_pool(config.num_pages, config.page_size, config.max_model_len))
    return config, build(config)


def build_executor(
    model: Any,
    model_config: Any,
    options: Any,
    config: Any,
    *,
    process: Any,
    eos_token_ids: Sequence[int],
    min_token_bucket: int,
    split_prefill_decode: bool,
    async_scheduling: bool,
    enable_prefix_caching: bool,
    prefix_cache_seed: int,
) -> Executor:
    """Runner, scheduler(s) and step loop for ``options`` over ``config`` (an ``EngineConfig``).

    ``options``: a ``ParallelOptions``, or a ``disagg.DisaggOptions`` (prefill and decode on
    two device groups). ``process``: the engine's callback turning a step's scheduler deltas
    into ``StreamDelta``\\ s."""
    if not isinstance(options, ParallelOptions):
        from energon_jax.disagg import build_disagg_executor

        return build_disagg_executor(
            model, model_config, options, config, process=process, eos_token_ids=eos_token_ids,
            min_token_bucket=min_token_bucket, split_prefill_decode=split_prefill_decode,
            async_scheduling=async_scheduling, enable_prefix_caching=enable_prefix_caching,
            prefix_cache_seed=prefix_cache_seed,
        )
    from energon_jax import batch as batch_lib
    from energon_jax.engine_config import param_dtype
    from energon_jax.scheduler import Scheduler, SchedulerConfig

    c = config
    scheduler_config = SchedulerConfig(
        max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
        max_model_len=c.max_model_len, page_size=c.page_size, num_pages=c.num_pages,
        static_batching=c.static_batching, enable_prefix_caching=enable_prefix_caching,
        prefix_cache_seed=prefix_cache_seed,
        attention_window=getattr(model_config, "kv_window", None),  # sliding window: release old pages
    )
    on_device = device_penalties(options)
    buckets = batch_lib.Buckets.create(
        max_num_batched_tokens=c.max_num_batched_tokens, max_num_seqs=c.max_num_seqs,
        max_model_len=c.max_model_len, page_size=c.page_size, min_tokens=min_token_bucket,
        penalty_tables=on_device, row_split=ROW_SPLIT,
        page_slots=2 * c.max_num_seqs if device_page_tables(options, scheduler_config.attention_window) else 0,
    )
    runner = build_runner(
        model, model_config, num_pages=c.num_pages, page_size=c.page_size, kv_dtype=param_dtype(model),
        options=options, templates=batch_lib.warmup_batches(buckets),
        max_rows=max(b for _, b in buckets.all_shapes()), penalty_slots=c.max_num_seqs if on_device else 0,
        buckets=buckets,
    )

    def new_scheduler() -> Scheduler:
        return Scheduler(scheduler_config, eos_token_ids=eos_token_ids)

    def loop_for(scheduler: Scheduler, replica: StepRunner) -> EngineLoop:
        return _loop_for(replica, scheduler, buckets, process, split_prefill_decode, async_scheduling)

    if dp_replicas(options):  # one scheduler (page pool, limits) and step loop per replica
        from energon_jax.parallel.data_parallel import DataParallelScheduler, DataParallelStepLoop

        scheduler: SchedulerView = DataParallelScheduler([new_scheduler() for _ in range(options.dp)])
        loop: EngineLoop = DataParallelStepLoop(scheduler, runner, make_loop=loop_for)
    else:
        scheduler = new_scheduler()
        loop = loop_for(scheduler, runner)
    ahead, overlap = describe_overlap(loop, runner, options, asked=async_scheduling)
    return Executor(runner, scheduler, loop, buckets, ahead, overlap)


def _loop_for(
    runner: StepRunner, scheduler: Scheduler, buckets: Any, process: Any, split: bool, ahead: bool
) -> EngineLoop:
    """The step loop that drives one (replica's) runner: a pipeline ticks, others step."""
    from energon_jax.parallel.pipeline import PipelineRunner, PipelineStepLoop
    from energon_jax.parallel.pipeline_controller import PipelineController
    from energon_jax.parallel.replica_pipeline import PipelineView
    from energon_jax.parallel.spmd_pipeline import SpmdPipelineRunner
    from energon_jax.step_loop import StepLoop

    # a micro-batch is never split nor planned past
    if isinstance(runner, (SpmdPipelineRunner, PipelineController, PipelineRunner, PipelineView)):
        return PipelineStepLoop(scheduler, runner, buckets, process)
    return StepLoop(scheduler, runner, buckets, process, split_prefill_decode=split,
                    plans_ahead=ahead and getattr(runner, "supports_prev_ids", False))


def describe_overlap(
    loop: EngineLoop, runner: CompiledRunner, options: ParallelOptions, *, asked: bool
) -> tuple[bool, str]:
    """Whether ``loop`` plans ahead, and why in words. A layout that cannot (a runner that cannot
    take the previous step's ids on device, a pipeline whose overlap is its micro-batches) logs
    it once, so asking for ``async_scheduling=True`` never silently runs synchronous steps."""
    loops = getattr(loop, "loops", [loop])
    ahead = bool(loops) and all(getattr(one, "plans_ahead", False) for one in loops)
    if ahead:
        text = "plans ahead: step N+1 is planned and dispatched before step N's ids are fetched"
    elif options.pp > 1:
        text = (f"pipeline: {options.pp} micro-batches in flight, one tick per step; the host "
                "fetches the micro-batch leaving each tick (no planning ahead)")
    elif asked:
        text = f"synchronous: the {type(runner).__name__} cannot take the previous step's ids on device"
    else:
        text = "synchronous: async_scheduling=False"
    if asked and not ahead:
        log.warning("async_scheduling is off for this layout: %s", text)
    return ahead, text


def validate_layout(options: ParallelOptions, model_config: Any) -> None:
    """The ``ValueError`` saying why ``options`` cannot run this model, before anything is placed."""
    c = model_config
    validate_model_parallelism(
        options, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, num_layers=c.num_layers,
        intermediate_size=getattr(c, "intermediate_size", None), num_experts=getattr(c, "num_experts", None),
    )


def build_runner(
    model: Any,
    model_config: Any,
    *,
    num_pages: int,
    page_size: int,
    kv_dtype: Any,
    options: ParallelOptions,
    templates: Sequence[Any] = (),
    max_rows: int = 256,
    penalty_slots: int = 0,
    buckets: Any = None,
) -> CompiledRunner:
    """The runner for ``options`` (see the module docstring). ``templates``: one batch per step
    shape (``batch.warmup_batches``), needed only across processes. ``max_rows``: the most rows
    of a step (``ModelRunner``'s sampled-ids buffer, for planning ahead). ``penalty_slots``:
    device penalty tables of each ``ModelRunner`` (when ``device_penalties``). ``buckets``:
    the step shapes (``batch.Buckets``), which a pipeline's tick picks from."""
    from energon_jax.runner import ModelRunner

    c = model_config
    validate_layout(options, c)

    def kv_pages(sharding: Any = None) -> tuple:
        from pallas_kernels import make_kv_pages

        return tuple(make_kv_pages(num_pages, page_size, c.num_kv_heads, c.head_dim, kv_dtype, sharding=sharding)
                     for _ in range(c.num_layers))

    penalties = dict(penalty_slots=penalty_slots, vocab=c.vocab_size)
    pages = {} if buckets is None or not buckets.page_slots else dict(  # ModelRunner's device page tables
        page_slots=buckets.page_slots, max_pages_per_row=buckets.max_pages_per_row)
    if options.single_device and jax.process_count() == 1:
        return ModelRunner(model, kv_pages(), max_rows=max_rows, **penalties, **pages)
    if options.offload is not None:
        from energon_jax.parallel.memory_pool import OffloadConfig, OffloadedRunner
        from energon_jax.parallel.stages import decoder_parts

        if jax.process_count() > 1:
            raise ValueError("offload is single-process: run it without jax.distributed")
        k = options.resident_layers if options.resident_layers is not None else 1
        return OffloadedRunner(decoder_parts(model), OffloadConfig(options.offload, k),
                               num_pages=num_pages, page_size=page_size, **penalties, **pages)
    mesh = make_mesh(options)
    rules = sharding_rules(options.tp, num_kv_heads=c.num_kv_heads, expert_parallel=options.expert_parallel)
    parts = _pipeline_parts(model, options.pp)
    if options.dp > 1 and jax.process_count() > 1:  # the replicas share one SPMD step or tick
        if parts is not None:  # replica_pipeline.py
            return _stacked_pipelines(parts, mesh, rules, num_pages, page_size, kv_dtype, templates, buckets,
                                      penalties)
        return _stacked_replicas(model, c, mesh, rules, num_pages, page_size, kv_dtype, templates, buckets,
                                 {**penalties, **pages})
    if dp_replicas(options):
        from energon_jax.parallel.data_parallel import DataParallelRunner

        replicas: list[StepRunner] = []
        for m in replica_meshes(mesh):  # each replica: its own weights and pages on its own devices
            if parts is not None:  # a pipeline over mesh[r, :, :]: stage s on mesh[r, s, :]
                replicas.append(_pipeline_runner(parts, m, rules, num_pages, page_size, kv_dtype, buckets,
                                                 penalties))
            else:
                kv = kv_pages(kv_pages_sharding(m, rules))
                replicas.append(ModelRunner(placed_copy(model, m, rules), kv, max_rows=max_rows, **penalties,
                                            **pages))
        return DataParallelRunner(replicas)
    if parts is not None:
        runner: StepRunner = _pipeline_runner(parts, mesh, rules, num_pages, page_size, kv_dtype, buckets,
                                              penalties)
    else:
        shard_model(model, mesh, rules)
        runner = ModelRunner(model, kv_pages(kv_pages_sharding(mesh, rules)), max_rows=max_rows,
                             **penalties, **pages)
    if jax.process_count() > 1:
        from energon_jax.parallel.controller import Controller
        from energon_jax.parallel.pipeline_controller import PipelineController
        from energon_jax.parallel.spmd_pipeline import SpmdPipelineRunner

        if not templates:
            raise ValueError("a multi-process run needs templates (batch.warmup_batches) for the controller")
        if isinstance(runner, SpmdPipelineRunner):  # broadcasts each tick's new micro-batch
            return PipelineController(runner, templates)
        return Controller(runner, templates)
    return runner


def dp_replicas(options: ParallelOptions) -> bool:
    """Whether the engine runs ``dp`` replicas, each with its own scheduler and step loop:
    ``dp > 1``. In one process they are independent runners (``DataParallelRunner``); across
    processes they share one stacked SPMD step (``replica_step.StackedReplicas``)."""
    return options.dp > 1


def _stacked_replicas(model: Any, c: Any, mesh: Any, rules: Any, num_pages: int, page_size: int, kv_dtype: Any,
                      templates: Sequence[Any], buckets: Any, tables: dict[str, int]) -> Any:
    """``dp`` replicas across processes: one ``ReplicaStepRunner`` over the ``(dp, 1, tp)`` mesh
    (weights over ``tp``, each replica's pages on its own devices), its stacked steps broadcast
    by a ``Controller``; the engine drives it through ``StackedReplicas``' replica views."""
    from energon_jax.parallel.controller import Controller
    from energon_jax.parallel.replica_step import ReplicaStepRunner, StackedReplicas, stack_batches

    if not templates or buckets is None:
        raise ValueError("a multi-process run needs templates (batch.warmup_batches) and buckets for the controller")
    dp = mesh.shape["dp"]
    shard_model(model, mesh, rules)  # over tp; the rules never name dp, so replicated over it
    runner = ReplicaStepRunner(model, mesh, rules, num_pages=num_pages, page_size=page_size,
                               num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, num_layers=c.num_layers,
                               kv_dtype=kv_dtype, **tables)
    controller = Controller(runner, [stack_batches([b] * dp) for b in templates])
    return StackedReplicas(controller, dp, buckets)


def _stacked_pipelines(parts: Any, mesh: Any, rules: Any, num_pages: int, page_size: int, kv_dtype: Any,
                       templates: Sequence[Any], buckets: Any, penalties: dict[str, int]) -> Any:
    """``dp`` pipelines across processes: one ``ReplicaPipelineRunner`` tick over the
    ``(dp, pp, tp)`` mesh (each replica's carry and pages on its own devices), broadcast by a
    ``Controller``; the engine drives it through ``StackedPipelines``' per-replica clocks."""
    from energon_jax.parallel.controller import Controller
    from energon_jax.parallel.replica_pipeline import ReplicaPipelineRunner, StackedPipelines, StackedTickDispatch
    from energon_jax.parallel.replica_step import stack_batches

    if not templates or buckets is None:
        raise ValueError("a multi-process run needs templates (batch.warmup_batches) and buckets for the controller")
    dp, pp = mesh.shape["dp"], mesh.shape["pp"]
    runner = ReplicaPipelineRunner(parts, mesh, rules, num_pages=num_pages, page_size=page_size, buckets=buckets,
                                   kv_dtype=kv_dtype, **penalties)
    controller = Controller(StackedTickDispatch(runner), [stack_batches([b] * dp) for b in templates])
    return StackedPipelines(controller, dp, pp, buckets)


def _pipeline_parts(model: Any, pp: int) -> Any:
    """The model cut into stage pieces when ``pp > 1`` (else None)."""
    if pp <= 1:
        return None
    from energon_jax.parallel.stages import decoder_parts

    return decoder_parts(model)


def _pipeline_runner(parts: Any, mesh: Any, rules: Any, num_pages: int, page_size: int, kv_dtype: Any,
                     buckets: Any, penalties: dict[str, int] | None = None) -> Any:
    """An ``SpmdPipelineRunner`` over ``mesh`` (``(1, pp, tp)``; a dp replica passes its slice).

    The per-stage ``pipeline.PipelineRunner`` is kept as the tests' reference only: one
    SPMD tick runs the same in one process and across processes, which the per-stage
    dispatch cannot; on 8 simulated CPU devices that dispatch is about 1.4-1.5x cheaper
    per tick for a tiny model (benchmarks/RESULTS.md, ``benchmarks/spmd_pipeline.py``)."""
    from energon_jax.parallel.spmd_pipeline import SpmdPipelineRunner

    if buckets is None:
        raise ValueError("a pipeline needs buckets (batch.Buckets): its ticks pick their shapes from them")
    return SpmdPipelineRunner(parts, mesh, rules, num_pages=num_pages, page_size=page_size, buckets=buckets,
                              kv_dtype=kv_dtype, **(penalties or {}))


def load_sharding(model_config: Any, options: Any) -> Any:
    """The ``models.load(param_sharding=)`` callback for a tensor-parallel engine, else None.

    Only the plain tp/dp layout loads into shards (with ``dp > 1``, replica 0's): the pipeline
    and offload runners place the layers themselves. The layout is validated here first, so a
    bad one fails before any weight is read. ``options``: a ``ParallelOptions``, or a
    ``disagg.DisaggOptions`` (weights load into the prefill group's shards)."""
    if not isinstance(options, ParallelOptions):
        from energon_jax import disagg

        return disagg.load_sharding(options, model_config)
    if options.tp <= 1 or options.pp > 1 or options.offload is not None or model_config.is_encoder:
        return None
    validate_layout(options, model_config)
    rules = sharding_rules(options.tp, num_kv_heads=model_config.num_kv_heads,
                           expert_parallel=options.expert_parallel)
    mesh = make_mesh(options)
    if dp_replicas(options) and jax.process_count() == 1:  # replica 0's shards; build_runner copies them
        mesh = replica_meshes(mesh)[0]
    return param_sharding_fn(mesh, rules)


def warm_up_with_progress(runner: CompiledRunner, batches: Sequence[Any]) -> int:
    """``runner.warmup(batches)`` under a progress bar (stderr, process 0) that ticks per compile."""
    from tqdm.auto import tqdm

    replicas = len(getattr(runner, "replicas", ())) or 1  # dp: each replica compiles its own
    with tqdm(total=len(batches) * replicas, desc="warm-up compiles", unit="shape",
              disable=jax.process_index() != 0) as bar:
        return runner.warmup(_Ticking(batches, bar))


class _Ticking(Sequence[Any]):
    """The warm-up batches; each pass ticks ``bar`` once a batch has been handled.

    A Sequence (not a one-shot iterator): a dp runner walks it once per replica.
    """

    def __init__(self, batches: Sequence[Any], bar: Any) -> None:
        self._batches, self._bar = batches, bar

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, i: Any) -> Any:
        return self._batches[i]

    def __iter__(self) -> Iterator[Any]:
        for batch in self._batches:
            yield batch  # the runner compiles it before asking for the next
            self._bar.update(1)
