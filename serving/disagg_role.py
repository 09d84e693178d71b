"""A prefill server or a decode server of a disaggregated deployment (``energon serve --role``).

Each role is its own process with its own JAX runtime, one ``Engine`` (``async_scheduling``
off: no step is in flight between two ``step()`` calls, so a request can be taken off or
handed to the scheduler between them), a ``jax.experimental.transfer`` server, and the
internal ``energon.v1.Disagg`` gRPC service (``protos/energon/v1/disagg.proto``) that the
router (``router.py``) calls. The path of one request:

1. ``Prefill``: the prefill engine prefills the prompt (chunked, batched with others) and
   samples the first token. Right after that step the request is released from the engine
   (``Engine.release``), its pages are gathered into one array per layer leaf
   (``PageMover.gather``: the jitted gather of ``page_transfer.py``, int8 scales included),
   offered with ``await_pull(uuid, arrays, timeout)`` on the transfer server, and the
   pages go back to the pool. The reply carries the first token and the descriptor
   (uuid, transfer address, page counts). Unpulled arrays are dropped at the timeout.
2. ``Decode``: the decode server ``pull``s the arrays straight into its pool's sharding
   (on its handler thread, overlapping its own steps), then, on the engine thread,
   allocates pages, scatters the arrays into them (``PageMover.scatter``, the pool donated)
   and adopts the request (``Engine.adopt``); tokens stream back until it finishes.
   A cancelled call aborts the request wherever it is, and its pages are free.

All engine calls run on one thread (``RoleWorker``); gRPC handler threads talk to it
through a command queue and per-request result queues.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from energon_jax.page_transfer import PageMover
from energon_jax.request import Request, RequestStatus, SamplingParams, StreamDelta
from pallas_kernels.page_layout import NULL_PAGE

log = logging.getLogger("energon.serving.disagg")

ROLES = ("prefill", "decode")
DEFAULT_PULL_TIMEOUT_S = 60.0  # gathered K/V nobody pulled by then are dropped by the transfer server


class Aborted(Exception):
    """Put in a request's result queue when it is aborted, so the handler waiting on it returns
    (a handler left blocked would hold its gRPC worker thread, and the process's exit, forever)."""


@dataclasses.dataclass(frozen=True)
class KvOffer:
    """What a prefill leaves for the decode server (mirrors the proto's ``KvDescriptor``)."""

    uuid: int
    transfer_address: str
    num_pages: int  # pages moved: the page table's entries that are not null
    bucket_pages: int
    num_computed_tokens: int
    null_slots: tuple[int, ...] = ()  # page-table entries a sliding window released
    cached_tokens: int = 0  # prompt tokens the prefill server's prefix cache held (reported in usage)


@dataclasses.dataclass
class PullStats:
    pulls: int = 0
    seconds: float = 0.0  # wall time of the pulls, until the arrays are ready here
    bytes: int = 0  # bucket padding included


@dataclasses.dataclass
class _Adoption:
    """A pulled request waiting on the engine thread for decode pages."""

    request: Request
    moved: Any  # per-leaf [bucket, ...] arrays on the decode pool's devices
    num_pages: int
    null_slots: tuple[int, ...]
    out: queue.Queue
    cancelled: threading.Event  # set when its call ended during the pull


class RoleWorker:
    """The engine thread of a role server and its transfer server."""

    def __init__(self, engine: Any, role: str, *, host: str = "127.0.0.1",
                 pull_timeout_s: float = DEFAULT_PULL_TIMEOUT_S) -> None:
        if role not in ROLES:
            raise ValueError(f"role={role!r} must be one of {ROLES}")
        if engine.async_scheduling:
            raise ValueError("a role server's engine must run with async_scheduling=False")
        from jax.experimental import transfer

        self.engine, self.role, self.pull_timeout_s = engine, role, pull_timeout_s
        kv = engine.runner.kv_cache
        client = next(iter(jax.tree.leaves(kv)[0].sharding.device_set)).client
        self.transfer = transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"])
        cfg = engine.scheduler.config
        self.mover = PageMover(-(-cfg.max_model_len // cfg.page_size))
        self._uuids = itertools.count(secrets.randbits(48))  # unique across restarts of a server
        self._cmds: queue.Queue[Callable[[], None]] = queue.Queue()
        self._outs: dict[str, queue.Queue] = {}  # request id -> where its deltas / offer go
        self._adoptions: list[_Adoption] = []
        self._connections: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failure: BaseException | None = None
        self.pull_stats = PullStats()
        self._thread = threading.Thread(target=self._run, name=f"energon-{role}", daemon=True)
        self._thread.start()

    # -- called from gRPC handler threads --------------------------------------------------
    @property
    def address(self) -> str:
        return self.transfer.address()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._outs)

    def pages(self) -> tuple[int, int]:
        s = self.engine.scheduler
        return s.pages_used, s.pages_total

    def prefill(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                cache_salt: str | None = None) -> queue.Queue:
        """Queue a prefill; the returned queue gets ``(delta, offer or None)`` or an exception.
        ``cache_salt``: the prefill server's prefix cache is shared only within one salt."""
        out: queue.Queue = queue.Queue()
        self._submit(lambda: self._add(rid, prompt_ids, params, out, cache_salt))
        return out

    def decode(self, rid: str, prompt_ids: list[int], params: SamplingParams, first_token: int,
               offer: KvOffer, cancelled: threading.Event) -> queue.Queue:
        """Pull the offered K/V (here, on the caller's thread), then queue the adoption; the
        returned queue gets ``StreamDelta``s up to the finished one, or an exception.

        ``cancelled`` is set (before ``abort(rid)`` is called) when the call ends early: a
        request cancelled during its pull is never given pages."""
        self.engine.check_request(prompt_ids, params)  # ValueError before any transfer
        # Penalties need nothing here: the adopted request's first decode row starts at its
        # prompt's end, so the step loop loads its penalty slot from the prompt (PenaltySlots'
        # rebuild path, as for a prompt whose prefix came from the prefix cache).
        out: queue.Queue = queue.Queue()
        moved = self._pull(offer)
        request = Request(request_id=rid, prompt_token_ids=list(prompt_ids), params=params,
                          output_token_ids=[first_token], status=RequestStatus.RUNNING,
                          num_computed_tokens=offer.num_computed_tokens, num_cached_tokens=offer.cached_tokens,
                          first_token_time=time.monotonic())
        adoption = _Adoption(request, moved, offer.num_pages, offer.null_slots, out, cancelled)
        self._submit(lambda: self._queue_adoption(adoption))
        return out

    def abort(self, rid: str) -> None:
        self._submit(lambda: self._abort(rid))

    def shutdown(self) -> None:
        self._stop.set()
        self._cmds.put(lambda: None)
        self._thread.join(timeout=10)

    def _submit(self, cmd: Callable[[], None]) -> None:
        if self.failure is not None:
            raise RuntimeError(f"the engine failed: {self.failure!r}")
        self._cmds.put(cmd)

    def _pull(self, offer: KvOffer) -> Any:
        """Fetch the gathered pages into arrays laid out like this pool's pages (leading dim the bucket)."""
        conn = self._connections.get(offer.transfer_address)
        if conn is None:
            conn = self._connections[offer.transfer_address] = self.transfer.connect(offer.transfer_address)
        specs = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((offer.bucket_pages, *a.shape[1:]), a.dtype, sharding=a.sharding),
            self.engine.runner.kv_cache,
        )
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.pull_timeout_s)
        t0 = time.perf_counter()
        moved = conn.pull(offer.uuid, specs, timeout=deadline)
        jax.block_until_ready(moved)
        with self._lock:
            st = self.pull_stats
            st.pulls += 1
            st.seconds += time.perf_counter() - t0
            st.bytes += sum(a.nbytes for a in jax.tree.leaves(moved))
        return moved

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished() or bool(self._adoptions)
                try:  # idle: sleep until a command comes
                    cmd = self._cmds.get_nowait() if busy else self._cmds.get()
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    cmd()
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        cmd = None
                self._start_adoptions()
                if self.engine.has_unfinished():
                    self._route(self.engine.step())
                if self.role == "prefill":
                    self._offer_prefilled()
        except BaseException as e:  # every waiting handler hears of it; the process exits non-zero
            log.exception("%s engine failed", self.role)
            self.failure = e
            with self._lock:
                outs = list(self._outs.values())
                self._outs.clear()
            for out in outs:
                out.put(e)

    def _add(self, rid: str, prompt_ids: list[int], params: SamplingParams, out: queue.Queue,
             cache_salt: str | None) -> None:
        try:
            self.engine.add_request(prompt_ids, params, request_id=rid, cache_salt=cache_salt)
        except ValueError as e:
            out.put(e)
            return
        with self._lock:
            self._outs[rid] = out

    def _abort(self, rid: str) -> None:
        for a in [a for a in self._adoptions if a.request.request_id == rid]:
            self._adoptions.remove(a)  # its pulled arrays are dropped; it holds no pages yet
        with self._lock:
            out = self._outs.pop(rid, None)
        if out is not None:
            out.put(Aborted(rid))
        self.engine.abort(rid)  # pages back in the pool (None when it is not here)

    def _queue_adoption(self, adoption: _Adoption) -> None:
        # Cancelled before this command ran: the abort command (queued after the event was
        # set) may already have run and found nothing, so it is dropped here.
        if adoption.cancelled.is_set():
            adoption.out.put(Aborted(adoption.request.request_id))
            return
        self._adoptions.append(adoption)
        with self._lock:
            self._outs[adoption.request.request_id] = adoption.out

    def _start_adoptions(self) -> None:
        """Pulled requests -> decode pages -> the scheduler, oldest first, while pages and rows last."""
        sched = self.engine.scheduler
        while self._adoptions:
            a = self._adoptions[0]
            rows_full = sched.num_running + sched.num_waiting >= sched.config.max_num_seqs
            if rows_full or not sched.allocator.can_allocate(a.num_pages + sched.num_running):
                if sched.num_running or sched.num_waiting:
                    return  # decoding requests will free pages
            self._adoptions.pop(0)
            pages = sched.allocator.allocate(a.num_pages)
            runner = self.engine.runner
            runner.kv_cache = self.mover.scatter(runner.kv_cache, pages, a.moved)
            fresh = iter(pages)
            table = len(pages) + len(a.null_slots)
            a.request.pages = [NULL_PAGE if i in a.null_slots else next(fresh) for i in range(table)]
            self.engine.adopt(a.request)

    def _route(self, deltas: list[StreamDelta]) -> None:
        for delta in deltas:
            rid = delta.request_id
            with self._lock:
                out = self._outs.get(rid)
            if out is None:
                continue
            if self.role == "decode":
                out.put(delta)
            elif delta.finished:  # finished on its first token: nothing to transfer
                out.put((delta, None))
            if delta.finished:
                with self._lock:
                    self._outs.pop(rid, None)

    def _offer_prefilled(self) -> None:
        """Every request of ours running with its first token (sampled by the step just
        finished; its delta is not out yet) leaves with its K/V offered for a pull."""
        with self._lock:
            rids = list(self._outs)
        sched = self.engine.scheduler
        for rid in rids:
            req = sched.get(rid)
            if req is None or req.status is not RequestStatus.RUNNING or not req.output_token_ids:
                continue
            with self._lock:
                out = self._outs.pop(rid)
            offer, ids, text, logprobs = self._offer(rid)
            out.put((StreamDelta(rid, text, ids, logprobs, False, None, None), offer))

    def _offer(self, rid: str) -> tuple[KvOffer, list[int], str, list | None]:
        """Release a request after its first token: gather its pages, offer them for one pull, free them."""
        request, ids, text = self.engine.release(rid)
        lp = request.output_logprobs
        logprobs = None if lp is None or not ids else list(lp[-len(ids):])
        live = [p for p in request.pages if p != NULL_PAGE]  # a sliding window's released pages stay null
        nulls = tuple(i for i, p in enumerate(request.pages) if p == NULL_PAGE)
        kv = self.engine.runner.kv_cache
        moved = self.mover.gather(kv, live)
        uuid = next(self._uuids)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.pull_timeout_s)
        self.transfer.await_pull(uuid, moved, timeout=deadline)
        self.engine.scheduler.allocator.free(live)  # the gather reading them is dispatched first
        offer = KvOffer(uuid, self.address, len(live), self.mover.bucket(len(live)),
                        request.num_computed_tokens, nulls, request.num_cached_tokens)
        return offer, ids, text, logprobs


def iterate(out: queue.Queue, *, timeout_s: float | None = None) -> Iterator[Any]:
    """Items of a result queue; an exception put there is raised."""
    while True:
        item = out.get(timeout=timeout_s)
        if isinstance(item, BaseException):
            raise item
        yield item
