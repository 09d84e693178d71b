"""Prefill/decode disaggregation in one process (Splitwise, DistServe): two disjoint device groups.

``Engine(..., prefill_devices=P, decode_devices=D, prefill_tp=, decode_tp=)`` builds two
meshes over disjoint devices (the first ``P`` devices prefill, the next ``D`` decode), each
with its own copy of the weights (sharded over its ``tp``; ``from_pretrained`` reads them
straight into the prefill group's shards, ``load_sharding``), its own KV page pool of
``kv_cache_pages`` pages, its own compiled steps (a ``ModelRunner`` each) and its own
``Scheduler`` and ``StepLoop``. The path of one request:

1. ``DisaggScheduler.add`` queues it in an inbox. Each engine step the inbox feeds the
   prefill scheduler while the prefill pool can hold every prompt given to it and the
   prefill side holds fewer than ``max_pending`` requests (prefilling or in the transfer
   queue): back-pressure, new requests wait in the inbox.
2. The prefill group prefills it (chunked, batched with other prompts) and samples its
   first token there; the first token is streamed from the prefill side. A request that
   finishes on its first token never leaves the prefill group.
3. Right after that step, the request is detached from the prefill scheduler, still
   holding its prefill pages, into the transfer queue (bounded: ``max_pending``).
4. As soon as the decode pool has room for its pages and the decode scheduler a row, the
   pages move (``PageMover``): gathered from the prefill pool on device, ``jax.device_put``
   to the decode pool's sharding (device to device, no host round trip), scattered into
   pages allocated in the decode pool (``page_transfer.py``: one jitted gather and scatter
   per page-count bucket; int8 pages move with their scales). The prefill pages are freed, the request
   is attached to the decode scheduler and decodes from the next decode step on.
5. ``DisaggStepLoop.step`` dispatches the prefill group's step and the decode group's step
   before fetching either, so the groups compute at the same time; transfers are
   dispatched asynchronously between them and overlap both. The prefill group never
   waits for decode: a request whose decode pages are not free waits in the queue.

Greedy tokens equal colocated serving's: the prompt's K/V are the same numbers whichever
group wrote them, and decoding reads them from the pages they were copied into. A request
that the decode pool later preempts is recomputed on the decode group (the colocated
fallback). Prefix caching stays on the prefill side (its pages are published there and
stay hits after the request moves on); the decode side caches nothing.

Where the time goes is counted: ``PageMover.stats`` (transfers, pages, bytes),
``DisaggScheduler.max_pending_seen``, ``DisaggStepLoop.both_on_device`` (engine steps in
which both groups computed at once) and each group loop's ``counts``.

Single process only (``jax.process_count() == 1``); a group is one tensor-parallel mesh
(``prefill_tp == prefill_devices``, no dp or pp inside a group).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import numpy as np

from energon_jax.request import Request, RequestStatus, StreamDelta
from energon_jax.sliding_window import live_pages
from energon_jax.step_loop import DispatchCounts, ProcessFn, StepLoop
from energon_jax.page_transfer import PageMover
from pallas_kernels.page_layout import NULL_PAGE, make_kv_pages

logger = logging.getLogger(__name__)

# Requests the prefill side may hold at once (prefilling, or prefilled and waiting for room
# in the decode pool): the transfer queue's bound. New requests wait in the inbox beyond it.
DEFAULT_MAX_PENDING = 64


@dataclasses.dataclass(frozen=True)
class DisaggOptions:
    """Where the two groups live: ``prefill_devices`` then ``decode_devices`` of ``jax.devices()``."""

    prefill_devices: int
    decode_devices: int
    prefill_tp: int | None = None  # None: every device of the group (the only layout for now)
    decode_tp: int | None = None
    max_pending: int = DEFAULT_MAX_PENDING  # the transfer queue's bound

    def __post_init__(self) -> None:
        for name in ("prefill_devices", "decode_devices", "max_pending"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        for side in ("prefill", "decode"):
            tp, devices = getattr(self, f"{side}_tp"), getattr(self, f"{side}_devices")
            if tp is not None and tp != devices:
                raise ValueError(f"{side}_tp={tp!r} must equal {side}_devices={devices}: a group is one "
                                 "tensor-parallel mesh (no dp or pp inside a group)")

    @classmethod
    def from_kwargs(
        cls, prefill_devices: int | None, decode_devices: int | None, prefill_tp: int | None = None,
        decode_tp: int | None = None,
    ) -> DisaggOptions | None:
        """The engine's keyword arguments: None (colocated, the default) when none is given."""
        if prefill_devices is None and decode_devices is None:
            if prefill_tp is not None or decode_tp is not None:
                raise ValueError(f"prefill_tp={prefill_tp} / decode_tp={decode_tp} need prefill_devices and "
                                 "decode_devices")
            return None
        if prefill_devices is None or decode_devices is None:
            raise ValueError(f"give both prefill_devices={prefill_devices} and decode_devices={decode_devices} "
                             "(or neither, for colocated serving)")
        return cls(prefill_devices, decode_devices, prefill_tp, decode_tp)

    @property
    def tp(self) -> tuple[int, int]:
        return (self.prefill_tp or self.prefill_devices, self.decode_tp or self.decode_devices)

    def layout(self) -> dict[str, int]:
        """The engine's ``info.layout`` entries of this layout."""
        p, d = self.tp
        return {"prefill_devices": self.prefill_devices, "decode_devices": self.decode_devices,
                "prefill_tp": p, "decode_tp": d}

    def describe(self) -> str:
        p, d = self.tp
        return (f"disaggregated: prefill on devices 0..{self.prefill_devices - 1} (tp={p}), decode on devices "
                f"{self.prefill_devices}..{self.prefill_devices + self.decode_devices - 1} (tp={d})")

    def group_devices(self, devices: Sequence[Any] | None = None) -> tuple[list[Any], list[Any]]:
        """The two disjoint device lists; ValueError when the machine has too few devices."""
        if jax.process_count() > 1:
            raise ValueError(f"disaggregation in one engine is single-process ({jax.process_count()} processes)")
        devices = list(jax.devices() if devices is None else devices)
        need = self.prefill_devices + self.decode_devices
        if need > len(devices):
            raise ValueError(f"prefill_devices={self.prefill_devices} + decode_devices={self.decode_devices} = "
                             f"{need} devices asked, but only {len(devices)} exist")
        return devices[: self.prefill_devices], devices[self.prefill_devices : need]


# The engine keyword arguments of this layout (``Engine.from_pretrained`` reads them to load).
ENGINE_KWARGS = ("prefill_devices", "decode_devices", "prefill_tp", "decode_tp")


def group_layouts(options: DisaggOptions, model_config: Any) -> list[tuple[Any, Any]]:
    """``(mesh, sharding rules)`` of the prefill group, then the decode group; ValueError when
    the model cannot be split over a group's ``tp`` or the devices are too few."""
    from energon_jax.parallel.mesh import make_mesh, sharding_rules
    from energon_jax.parallel.options import ParallelOptions
    from energon_jax.parallel.runtime import validate_layout

    out = []
    for tp, devices in zip(options.tp, options.group_devices()):
        layout = ParallelOptions(tp=tp)
        validate_layout(layout, model_config)
        out.append((make_mesh(layout, devices), sharding_rules(tp, num_kv_heads=model_config.num_kv_heads)))
    return out


def load_sharding(options: DisaggOptions, model_config: Any) -> Any:
    """The ``models.load(param_sharding=)`` callback: weights are read straight into the prefill
    group's shards (its runner then shares them; the decode group gets a copy), so no device
    holds a third copy. None for an encoder (it has no disaggregated layout)."""
    from energon_jax.parallel.mesh import param_sharding_fn

    if model_config.is_encoder:
        return None
    mesh, rules = group_layouts(options, model_config)[0]
    return param_sharding_fn(mesh, rules)


class DisaggRunner:
    """The two groups' ``ModelRunner``s and the mover between their pools (warm-up, compile counts).

    ``replicas`` lists both runners, so that code walking a data-parallel engine's replicas
    (warm-up progress, memory profiling) sees both groups."""

    supports_prev_ids = False  # the loops drive each group's runner themselves

    def __init__(self, prefill: Any, decode: Any, mover: PageMover) -> None:
        self.prefill, self.decode, self.mover = prefill, decode, mover
        self.replicas = [prefill, decode]

    @property
    def num_compiles(self) -> int:
        return self.prefill.num_compiles + self.decode.num_compiles + self.mover.num_compiles

    @property
    def kv_caches(self) -> list[Any]:
        return [self.prefill.kv_cache, self.decode.kv_cache]

    def warmup(self, batches: Sequence[Any]) -> int:
        self.prefill.warmup(batches)
        self.decode.warmup(batches)
        self.decode.kv_cache = self.mover.warmup(self.prefill.kv_cache, self.decode.kv_cache)
        return self.num_compiles

    def transfer(self, src_pages: Sequence[int], dst_pages: Sequence[int]) -> None:
        """Move pages of the prefill pool into pages of the decode pool (dispatched, not awaited)."""
        self.decode.kv_cache = self.mover.move(self.prefill.kv_cache, self.decode.kv_cache, src_pages, dst_pages)
        st = self.mover.stats
        st.transfers += 1
        st.pages += len(src_pages)
        st.bytes += len(src_pages) * sum(a.nbytes // a.shape[0] for a in jax.tree.leaves(self.prefill.kv_cache))


class DisaggScheduler:
    """The engine's view of the two schedulers plus the inbox and the transfer queue.

    A request is in exactly one place: the inbox, the prefill scheduler, the transfer queue
    (``pending``, holding its prefill pages) or the decode scheduler."""

    def __init__(self, prefill: Any, decode: Any, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.prefill, self.decode = prefill, decode
        self.config = prefill.config  # the engine's limits (both groups have the same)
        self.max_pending = max_pending
        self.inbox: collections.deque[Request] = collections.deque()
        self.pending: collections.deque[Request] = collections.deque()  # prefilled, waiting for decode pages
        self.max_pending_seen = 0  # the most requests the transfer queue held at once

    # -- requests in and out ------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a new request (the engine validated its lengths against the pool)."""
        rid = request.request_id
        if self.get(rid) is not None:
            raise ValueError(f"request_id={rid!r} is already in use by an unfinished request")
        if request.status is not RequestStatus.WAITING or request.pages or request.num_computed_tokens:
            raise ValueError(f"request_id={rid!r} has status={request.status.value}; only new requests can be added")
        self.inbox.append(request)

    def get(self, request_id: str) -> Request | None:
        for req in (*self.inbox, *self.pending):
            if req.request_id == request_id:
                return req
        return self.prefill.get(request_id) or self.decode.get(request_id)

    def abort(self, request_id: str) -> Request | None:
        return self.finish(request_id, "abort")

    def finish(self, request_id: str, reason: str) -> Request | None:
        """Finish wherever the request is; its pages (prefill or decode) are free when this returns."""
        for queue in (self.inbox, self.pending):
            req = next((r for r in queue if r.request_id == request_id), None)
            if req is not None:
                queue.remove(req)
                self.prefill.allocator.free(live_pages(req.pages))  # inbox requests hold none
                req.pages = []
                req.status, req.finish_reason, req.finish_time = RequestStatus.FINISHED, reason, time.monotonic()
                return req
        req = self.prefill.finish(request_id, reason)
        return req if req is not None else self.decode.finish(request_id, reason)

    def has_work(self) -> bool:
        return bool(self.inbox or self.pending) or self.prefill.has_work() or self.decode.has_work()

    # -- moving requests along ------------------------------------------------------------
    def _prompt_pages(self, req: Request) -> int:
        return self.prefill.allocator.pages_needed(len(req.prompt_token_ids))

    def feed_prefill(self) -> int:
        """Inbox -> prefill scheduler, oldest first, while the prefill pool can hold every prompt
        it was given at once (so it never preempts, and pages held by the queue never leave it
        stuck) and the requests on the prefill side (prefilling or in the transfer queue) stay
        within ``max_pending``, the queue's bound; returns how many moved."""
        held = (*self.prefill.running, *self.prefill.waiting)
        reserved = sum(len(live_pages(r.pages)) for r in self.pending) + sum(self._prompt_pages(r) for r in held)
        queued = len(self.pending) + len(held)  # every one of them ends up in the transfer queue
        moved = 0
        while self.inbox and queued + moved < self.max_pending:
            need = self._prompt_pages(self.inbox[0])
            if reserved + need > self.prefill.allocator.num_usable:
                break
            self.prefill.add(self.inbox.popleft())
            reserved += need
            moved += 1
        return moved

    def take_prefilled(self) -> int:
        """Prefill scheduler -> transfer queue: every running request that has its first token."""
        done = [r for r in self.prefill.running if r.output_token_ids]
        for req in done:
            self.pending.append(self.prefill.detach(req.request_id))
        self.max_pending_seen = max(self.max_pending_seen, len(self.pending))
        return len(done)

    def start_transfers(self, transfer: Callable[[Sequence[int], Sequence[int]], None]) -> int:
        """Transfer queue -> decode scheduler, oldest first, while the decode pool has the pages
        and the decode scheduler a row. ``transfer(src_pages, dst_pages)`` moves the K/V."""
        started = 0
        dec = self.decode
        while self.pending:
            req = self.pending[0]
            src = [p for p in req.pages if p != NULL_PAGE]  # a sliding window's released pages stay null
            # Room for its pages plus a page for each request already decoding (the next page
            # each may need soon): a fuller pool would only take pages its requests are about
            # to preempt each other for. An empty decode group always takes it (the pool holds
            # one whole sequence).
            room = dec.allocator.can_allocate(len(src) + dec.num_running)
            if dec.num_running + dec.num_waiting >= dec.config.max_num_seqs or not room:
                break
            self.pending.popleft()
            dst = iter(dec.allocator.allocate(len(src)))
            pages = [NULL_PAGE if p == NULL_PAGE else next(dst) for p in req.pages]
            transfer(src, [p for p in pages if p != NULL_PAGE])
            self.prefill.allocator.free(src)  # the gather that reads them is dispatched first
            req.pages = pages
            dec.attach(req)
            started += 1
        return started

    # -- accounting (the engine's stats) -------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.inbox) + self.prefill.num_waiting + self.decode.num_waiting

    @property
    def num_running(self) -> int:
        return self.prefill.num_running + len(self.pending) + self.decode.num_running

    @property
    def pages_used(self) -> int:
        return self.prefill.pages_used + self.decode.pages_used

    @property
    def pages_total(self) -> int:
        return self.prefill.pages_total + self.decode.pages_total

    @property
    def pages_cached(self) -> int:
        return self.prefill.pages_cached

    @property
    def prefix_cache_queries(self) -> int:
        return self.prefill.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.prefill.prefix_cache_hits

    @property
    def num_preemptions(self) -> int:
        return self.prefill.num_preemptions + self.decode.num_preemptions

    @property
    def num_planned_ahead(self) -> int:
        return self.prefill.num_planned_ahead + self.decode.num_planned_ahead

    def reset_prefix_cache(self) -> int:
        return self.prefill.reset_prefix_cache()


class DisaggStepLoop:
    """The engine's step loop for two groups: both groups' steps dispatched before either is fetched."""

    def __init__(
        self, scheduler: DisaggScheduler, runner: DisaggRunner, buckets: Any, process: ProcessFn, *,
        split_prefill_decode: bool = False, plans_ahead: bool = False,
    ) -> None:
        self.scheduler, self.runner = scheduler, runner
        # Prefill never plans ahead: a request leaves the prefill group right after the step
        # that samples its first token, so no plan may hold it past that step.
        self.prefill = StepLoop(scheduler.prefill, runner.prefill, buckets, process,
                                split_prefill_decode=split_prefill_decode, plans_ahead=False)
        self.decode = StepLoop(scheduler.decode, runner.decode, buckets, process,
                               split_prefill_decode=split_prefill_decode, plans_ahead=plans_ahead)
        self.plans_ahead = self.decode.plans_ahead  # what the engine's overlap note reports
        self.both_on_device = 0  # engine steps in which both groups had a step on their devices

    @property
    def num_planned_ahead(self) -> int:
        return self.decode.num_planned_ahead

    @property
    def counts(self) -> DispatchCounts:
        return self.prefill.counts + self.decode.counts

    def busy(self) -> bool:
        return self.prefill.busy() or self.decode.busy() or bool(self.scheduler.pending)

    def step(self, live: Collection[str]) -> list[StreamDelta]:
        """Feed the prefill group, start ready transfers, start both groups, then finish both.

        The first-token delta of a request is emitted by the prefill loop (at the latest in
        its next ``start``), always before the decode loop can emit its second token."""
        s = self.scheduler
        s.feed_prefill()
        s.start_transfers(self.runner.transfer)  # dispatched before the decode step that reads them
        out = self.prefill.start(())
        out.extend(self.decode.start(()))
        if self.prefill.on_device and self.decode.on_device:
            self.both_on_device += 1
        out.extend(self.prefill.finish())
        s.take_prefilled()  # no prefill plan is in flight now
        out.extend(self.decode.finish())
        if not out and live and not s.has_work() and not self.busy():
            raise RuntimeError(f"schedulers have no work but requests {sorted(live)} are unfinished")
        return out


def build_disagg_executor(
    model: Any,
    model_config: Any,
    options: DisaggOptions,
    config: Any,
    *,
    process: ProcessFn,
    eos_token_ids: Sequence[int],
    min_token_bucket: int,
    split_prefill_decode: bool,
    async_scheduling: bool,
    enable_prefix_caching: bool,
    prefix_cache_seed: int,
) -> Any:
    """``parallel.runtime.build_executor`` for a disaggregated engine: the ``Executor`` (runner,
    scheduler view, step loop, buckets) of the two groups over ``config`` (an ``EngineConfig``).

    Each group's runner keeps penalty counts on its devices (no history in any batch): a
    request that moves to the decode group starts there past position 0 on a slot the
    decode group's ``PenaltySlots`` has not seen, so it is rebuilt once from the host
    (one ``[V]`` upload, ``penalty_slots.py``), as for a prefix-cache hit."""
    from energon_jax import batch as batch_lib
    from energon_jax.engine_config import param_dtype
    from energon_jax.parallel.mesh import kv_pages_sharding, placed_copy
    from energon_jax.parallel.options import ParallelOptions
    from energon_jax.parallel.runtime import ROW_SPLIT, Executor, describe_overlap
    from energon_jax.runner import ModelRunner
    from energon_jax.scheduler import Scheduler, SchedulerConfig

    c, mc = config, model_config
    sc = SchedulerConfig(
        max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
        max_model_len=c.max_model_len, page_size=c.page_size, num_pages=c.num_pages,
        static_batching=c.static_batching, enable_prefix_caching=enable_prefix_caching,
        prefix_cache_seed=prefix_cache_seed, attention_window=getattr(mc, "kv_window", None),
    )
    buckets = batch_lib.Buckets.create(
        max_num_batched_tokens=c.max_num_batched_tokens, max_num_seqs=c.max_num_seqs,
        max_model_len=c.max_model_len, page_size=c.page_size, min_tokens=min_token_bucket,
        penalty_tables=True, row_split=ROW_SPLIT,
    )
    max_rows = max(b for _, b in buckets.all_shapes())
    runners = []
    for mesh, rules in group_layouts(options, mc):  # weights already placed there are shared, not copied
        sharding = kv_pages_sharding(mesh, rules)
        kv = tuple(make_kv_pages(c.num_pages, c.page_size, mc.num_kv_heads, mc.head_dim, param_dtype(model),
                                 sharding=sharding) for _ in range(mc.num_layers))
        runners.append(ModelRunner(placed_copy(model, mesh, rules), kv, max_rows=max_rows,
                                   penalty_slots=c.max_num_seqs, vocab=mc.vocab_size))
    prefill = Scheduler(sc, eos_token_ids=eos_token_ids)
    decode = Scheduler(dataclasses.replace(sc, enable_prefix_caching=False), eos_token_ids=eos_token_ids)
    scheduler = DisaggScheduler(prefill, decode, max_pending=options.max_pending)
    runner = DisaggRunner(runners[0], runners[1], PageMover(-(-c.max_model_len // c.page_size)))
    loop = DisaggStepLoop(scheduler, runner, buckets, process, split_prefill_decode=split_prefill_decode,
                          plans_ahead=async_scheduling)
    ahead, overlap = describe_overlap(loop, runner, ParallelOptions(), asked=async_scheduling)
    overlap = f"{options.describe()}; the groups' steps run at once, the decode group {overlap}"
    logger.info("%s; prefix caching %s on the prefill side (off on the decode side); transfer queue of %d",
                options.describe(), "on" if enable_prefix_caching else "off", options.max_pending)
    return Executor(runner, scheduler, loop, buckets, ahead, overlap)
