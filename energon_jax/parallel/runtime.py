"""One entry point for the engine: the step runner for a parallel configuration.

``Engine(..., tp=, pp=, dp=, offload=, resident_layers=)`` hands its options here and
gets back an object with the ``ModelRunner`` interface (``step_async``, ``step``,
``warmup``, ``num_compiles``, ``kv_cache``):

- nothing asked, one process: a plain ``ModelRunner`` on the default device;
- ``tp``: the model sharded over a ``(1, 1, tp)`` mesh by its logical axes, KV pages
  split by KV head (``mesh.py``), one ``ModelRunner`` over all of it;
- ``dp > 1``: a ``DataParallelRunner`` (``data_parallel.py``): ``dp`` independent
  replicas, replica ``r`` on the sub-mesh ``mesh[r, :, :]`` (its own ``pp * tp``
  devices) with its own copy of the weights and its own KV page pool of ``num_pages``
  pages: a ``ModelRunner``, or with ``pp > 1`` a ``PipelineRunner`` over that slice
  (stage ``s`` on ``mesh[r, s, :]``); the engine gives each replica its own scheduler
  and step loop. Within one process only: across processes (``jax.distributed``) the
  controller broadcasts one runner's steps, so there ``dp`` falls back to one
  ``ModelRunner`` over the whole ``(dp, 1, tp)`` mesh that every ``dp`` group computes
  alike (correct, no extra throughput; logged as a warning);
- ``pp > 1``: a ``PipelineRunner`` (stages of contiguous layers, each on ``mesh[:, s, :]``),
  which the engine drives with ``PipelineStepLoop`` (``pp`` micro-batches in flight);
  single-process for now;
- ``offload``: an ``OffloadedRunner`` (``resident_layers`` on device, the rest streamed);
- more than one process: whatever the above gave, wrapped in a ``Controller`` so that
  process 0's steps are broadcast and every process runs them (workers call
  ``controller.serve()``).

The model is validated against the layout first, so an impossible configuration is a
``ValueError`` that says why before anything is placed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax

from energon_jax.parallel.mesh import (
    ParallelConfig, kv_pages_sharding, make_mesh, param_sharding_fn, placed_copy, replica_meshes, shard_model,
    sharding_rules, validate_model_parallelism,
)
from energon_jax.parallel.memory_pool import OffloadConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ParallelOptions:
    dp: int = 1
    pp: int = 1
    tp: int = 1
    offload: str | None = None  # "host" | "peer"
    resident_layers: int | None = None
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        ParallelConfig(self.dp, self.pp, self.tp)  # validates the sizes
        if self.offload is None:
            if self.resident_layers is not None:
                raise ValueError(f"resident_layers={self.resident_layers} needs offload='host' or 'peer'")
            return
        OffloadConfig(self.offload, self.resident_layers if self.resident_layers is not None else 1)
        if (self.dp, self.pp, self.tp) != (1, 1, 1):
            raise ValueError(
                f"offload={self.offload!r} runs on one compute device: dp={self.dp}, pp={self.pp}, tp={self.tp} "
                "must all be 1"
            )

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.dp, self.pp, self.tp)


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
) -> Any:
    """The runner for ``options`` (see the module docstring). ``templates``: one batch per step
    shape (``batch.warmup_batches``), needed only across processes. ``max_rows``: the most rows
    of a step (``ModelRunner``'s sampled-ids buffer, for planning ahead)."""
    from energon_jax.runner import ModelRunner
    from pallas_kernels import make_kv_pages

    c = model_config
    validate_model_parallelism(
        options.parallel, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, num_layers=c.num_layers,
        intermediate_size=getattr(c, "intermediate_size", None),
    )
    if options.offload is not None:
        from energon_jax.parallel.memory_pool import OffloadedRunner
        from energon_jax.parallel.stages import decoder_parts

        if jax.process_count() > 1:
            raise ValueError("offload is single-process: run it without jax.distributed")
        k = options.resident_layers if options.resident_layers is not None else 1
        runner = OffloadedRunner(decoder_parts(model), OffloadConfig(options.offload, k),
                                 num_pages=num_pages, page_size=page_size)
        return runner
    if options.dp > 1 and jax.process_count() > 1:
        if options.pp > 1:
            raise ValueError(f"dp={options.dp} with pp={options.pp} is single-process for now "
                             f"({jax.process_count()} processes): use tp across processes")
        log.warning("dp=%d across %d processes: every dp group computes the same step (the controller broadcasts "
                    "one runner's steps); dp adds throughput only within one process", options.dp,
                    jax.process_count())
    mesh = make_mesh(options.parallel)
    rules = sharding_rules(options.tp, num_kv_heads=c.num_kv_heads, expert_parallel=options.expert_parallel)
    if dp_replicas(options):
        from energon_jax.parallel.data_parallel import DataParallelRunner

        replicas = []
        parts = _pipeline_parts(model, options.pp)
        for m in replica_meshes(mesh):  # each replica: its own weights and pages on its own devices
            if parts is not None:  # a pipeline over mesh[r, :, :]: stage s on mesh[r, s, :]
                replicas.append(_pipeline_runner(parts, m, rules, num_pages, page_size, kv_dtype))
                continue
            sharding = kv_pages_sharding(m, rules)
            kv = tuple(make_kv_pages(num_pages, page_size, c.num_kv_heads, c.head_dim, kv_dtype, sharding=sharding)
                       for _ in range(c.num_layers))
            replicas.append(ModelRunner(placed_copy(model, m, rules), kv, max_rows=max_rows))
        return DataParallelRunner(replicas)
    parts = _pipeline_parts(model, options.pp)
    if parts is not None:
        runner = _pipeline_runner(parts, mesh, rules, num_pages, page_size, kv_dtype)
    else:
        shard_model(model, mesh, rules)
        sharding = kv_pages_sharding(mesh, rules)
        kv = tuple(make_kv_pages(num_pages, page_size, c.num_kv_heads, c.head_dim, kv_dtype, sharding=sharding)
                   for _ in range(c.num_layers))
        runner = ModelRunner(model, kv, max_rows=max_rows)
    if jax.process_count() > 1:
        from energon_jax.parallel.controller import Controller

        if not templates:
            raise ValueError("a multi-process run needs templates (batch.warmup_batches) for the controller")
        return Controller(runner, templates)
    return runner


def dp_replicas(options: ParallelOptions) -> bool:
    """Whether the engine runs ``dp`` independent replicas (``DataParallelRunner``): ``dp > 1``
    in one process. Across processes ``dp`` replicates one step over the global mesh."""
    return options.dp > 1 and jax.process_count() == 1


def _pipeline_parts(model: Any, pp: int) -> Any:
    """The model cut into stage pieces when ``pp > 1`` (else None); pipelines are single-process."""
    if pp <= 1:
        return None
    if jax.process_count() > 1:
        raise ValueError(f"pp={pp} is single-process for now: use tp/dp across processes")
    from energon_jax.parallel.stages import decoder_parts

    return decoder_parts(model)


def _pipeline_runner(parts: Any, mesh: Any, rules: Any, num_pages: int, page_size: int, kv_dtype: Any) -> Any:
    """A ``PipelineRunner`` over ``mesh`` (``(dp, pp, tp)``; a dp replica passes its ``(1, pp, tp)`` slice)."""
    from energon_jax.parallel.pipeline import PipelineRunner

    return PipelineRunner(parts, mesh, rules, num_pages=num_pages, page_size=page_size, kv_dtype=kv_dtype)


def load_sharding(model_config: Any, engine_kwargs: dict[str, Any]) -> Any:
    """The ``models.load(param_sharding=)`` callback for a tensor-parallel engine, else None.

    Only the plain tp/dp layout loads into shards (with ``dp > 1``, replica 0's): the pipeline
    and offload runners place the layers themselves, and ``build_runner`` validates the layout
    again either way."""
    keys = ("dp", "pp", "tp", "offload", "resident_layers")
    options = ParallelOptions(**{k: engine_kwargs[k] for k in keys if k in engine_kwargs})
    if options.tp <= 1 or options.pp > 1 or options.offload is not None or model_config.is_encoder:
        return None
    c = model_config
    validate_model_parallelism(  # the same ValueError build_runner would give, before any weight is read
        options.parallel, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, num_layers=c.num_layers,
        intermediate_size=getattr(c, "intermediate_size", None),
    )
    rules = sharding_rules(options.tp, num_kv_heads=c.num_kv_heads)
    mesh = make_mesh(options.parallel)
    if dp_replicas(options):  # load into replica 0's shards; build_runner copies them to the others
        mesh = replica_meshes(mesh)[0]
    return param_sharding_fn(mesh, rules)
