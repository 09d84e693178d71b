"""The engine: continuous batching over a paged KV cache, driven one step at a time.

What flows in: prompts (text or token ids) with ``SamplingParams``. What flows out:
``RequestOutput`` (``generate``), ``StreamDelta`` (``stream``, and ``AsyncEngine``), or
pooled embeddings (``embed``, encoder checkpoints). Which thread: whichever calls
``step`` (the caller's for ``generate``/``stream``; the step-loop thread of
``AsyncEngine``); nothing here is shared between threads.

The step loop (``step_loop.py``): every ``step()`` plans a step with the scheduler,
packs it into one padding-free bucketed batch, dispatches it to the runner and turns
the sampled ids into deltas; with ``async_scheduling`` (the default) the next step is
planned and dispatched while the previous one runs. Runner, scheduler and step loop
come from ``parallel/runtime.py``, built from one ``ParallelOptions`` (``tp``, ``pp``,
``dp``, offload): a pipeline ticks with ``pp`` micro-batches in flight, ``dp`` replicas
each keep their own requests behind a scheduler view. The engine itself keeps only the
requests' bookkeeping (``request_book.py``), and the tokens are the same whatever the layout.

On the CPU (jnp reference attention) a step that mixes decode rows with a prefill chunk
runs as two device calls, decode rows then prefill rows (``step_split.py`` says why);
such a step is not planned past (its ids are fetched before the next plan).

Stop strings are matched on detokenized text, which the engine owns (``output.py``):
requests with stop strings are detokenized right after their step, so that a match
finishes them before the next step is planned; the other requests' text is produced
during the next device step.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from energon_jax.engine_config import PromptInput, as_params_list, as_prompt_list, demo_model_path
from energon_jax.memory_sizing import DEFAULT_KV_CACHE_MEMORY_FRACTION, check_fraction
from energon_jax.request import (
    Request, RequestOutput, SamplingParams, StreamDelta, validate_cache_salt, validate_prompt,
)
from energon_jax.request_book import RequestBook
from energon_jax.parallel.options import ParallelOptions
from energon_jax.protocols import CompiledRunner, EngineLoop, SchedulerView

logger = logging.getLogger(__name__)

# Show a progress bar from this many prompts on (unless use_tqdm=False).
TQDM_MIN_PROMPTS = 8


class Engine:
    """Offline and streaming generation over one model (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        model_config: Any,
        tokenizer: Any | None = None,
        *,
        max_model_len: int | None = None,
        page_size: int = 16,
        kv_cache_pages: int | None = None,
        kv_cache_bytes: int | None = None,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 512,
        static_batching: bool = False,
        min_token_bucket: int = 16,
        split_prefill_decode: bool | None = None,
        async_scheduling: bool | None = None,
        warmup: bool = True,
        sentence_config: Any | None = None,
        model_path: str | None = None,
        parallel: ParallelOptions | None = None,
        tp: int = 1,
        pp: int = 1,
        dp: int = 1,
        offload: str | None = None,
        resident_layers: int | None = None,
        expert_parallel: bool = False,
        kv_cache_memory_fraction: float = DEFAULT_KV_CACHE_MEMORY_FRACTION,
        enable_prefix_caching: bool = True,
        prefix_cache_seed: int | None = None,
        prefill_devices: int | None = None,
        decode_devices: int | None = None,
        prefill_tp: int | None = None,
        decode_tp: int | None = None,
    ) -> None:
        # The parallel layout: one frozen object (``parallel=``, or the shorthand), turned into
        # runner, scheduler and step loop by parallel/runtime.py.
        self.parallel = ParallelOptions.resolve(parallel, dp=dp, pp=pp, tp=tp, offload=offload,
                                                resident_layers=resident_layers, expert_parallel=expert_parallel)
        from energon_jax.disagg import DisaggOptions

        # Prefill and decode on disjoint device groups (disagg.py); None: colocated, the default.
        self.disagg = DisaggOptions.from_kwargs(prefill_devices, decode_devices, prefill_tp, decode_tp)
        if self.disagg is not None and not self.parallel.single_device:
            raise ValueError(f"prefill_devices/decode_devices lay out the devices themselves: parallel={self.parallel} "
                             "must be the default (tp, pp, dp, offload unset)")
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.model_path = model_path
        self._model = model
        self._book = RequestBook(tokenizer)  # live requests, and finished ones whose output is not taken
        self._loop: EngineLoop | None = None  # built with the runner (decoders only)
        if async_scheduling is None:
            # On by default everywhere. An accelerator runs the step off the host cores; on
            # the 2-core CPU box, once paged attention stopped copying the pool, planning
            # ahead measured 0.87x-1.06x of the synchronous loop (noise), no longer 0.5x.
            async_scheduling = True
        self.async_scheduling = async_scheduling  # asked; once built, what the step loop really does
        # Automatic prefix caching (kv_cache.py, prefix_cache.py); decoders only, the embedder has no cache.
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"{enable_prefix_caching=} must be a bool")
        if prefix_cache_seed is not None and not (isinstance(prefix_cache_seed, int) and prefix_cache_seed >= 0):
            raise ValueError(f"{prefix_cache_seed=} must be None or an integer >= 0")
        self.enable_prefix_caching = enable_prefix_caching and not model_config.is_encoder
        # One root for every dp replica (so a request's page hashes mean the same on each):
        # random per engine unless pinned.
        self._prefix_cache_seed = secrets.randbits(63) if prefix_cache_seed is None else prefix_cache_seed
        self._embedder = None  # an EmbeddingRunner (encoders only)
        if model_config.is_encoder:  # an encoder gets its own runner: no scheduler, no KV pool
            from energon_jax.embedding import EmbeddingRunner, embedder_config

            self._embedder = EmbeddingRunner(model, model_config, tokenizer, embedder_config(
                model_config, sentence_config, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, min_token_bucket=min_token_bucket,
            ), sentence_config)
            self.config = self._embedder.config
            self._scheduler = self._runner = None
            if warmup:
                self._embedder.warmup()
            return
        check_fraction(kv_cache_memory_fraction)
        if min_token_bucket < 1:
            raise ValueError(f"{min_token_bucket=} must be >= 1")
        self._min_token_bucket = min_token_bucket
        if split_prefill_decode is None:  # see step_split.py: only the jnp reference attention gains
            from pallas_kernels import resolve_implementation

            split_prefill_decode = resolve_implementation("auto") == "reference"
        self.split_prefill_decode = split_prefill_decode
        from energon_jax.parallel.runtime import sized_executor

        self.config, ex = sized_executor(
            model, model_config, self._executor, memory_fraction=kv_cache_memory_fraction,
            max_model_len=max_model_len, page_size=page_size, kv_cache_pages=kv_cache_pages,
            kv_cache_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            static_batching=static_batching,
        )
        self._runner, self._scheduler, self._loop, self._buckets = ex.runner, ex.scheduler, ex.loop, ex.buckets
        self.async_scheduling, self.overlap = ex.async_scheduling, ex.overlap
        if warmup:
            self.warmup()

    def _executor(self, config: Any) -> Any:
        """Runner, scheduler (view) and step loop for the layout over ``config`` (``parallel/runtime.py``):
        ``self.parallel``, or with ``prefill_devices`` two device groups (``disagg.py``)."""
        from energon_jax.parallel.runtime import build_executor

        return build_executor(
            self._model, self.model_config, self.disagg or self.parallel, config, process=self._process,
            eos_token_ids=self.eos_token_ids, min_token_bucket=self._min_token_bucket,
            split_prefill_decode=self.split_prefill_decode, async_scheduling=self.async_scheduling,
            enable_prefix_caching=self.enable_prefix_caching, prefix_cache_seed=self._prefix_cache_seed,
        )

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        dtype: str = "float32",
        quantize: str | None = None,
        sparsity: float | None = None,
        **engine_kwargs: Any,
    ) -> Engine:
        """Load a Hugging Face checkpoint directory (``None``: the embedded demo model).

        ``quantize="int8"`` or ``sparsity=0.8`` compress the linear layers after loading
        (``energon_jax/quantize.py``). With ``tp > 1`` (no pipeline, no offload) each weight is
        read straight into its tensor-parallel shards.
        """
        from models.loading import load, load_config
        from models.sentence_config import read_sentence_config

        from energon_jax import disagg
        from energon_jax.parallel.runtime import load_sharding
        from energon_jax.quantize import compression_mode, quantize_model
        from energon_jax.tokenizer import Tokenizer

        compression = compression_mode(quantize, sparsity)
        root = demo_model_path() if path is None else Path(path)
        parallel = engine_kwargs.pop("parallel", None) or ParallelOptions.take(engine_kwargs)
        layout = disagg.DisaggOptions.from_kwargs(*(engine_kwargs.get(k) for k in disagg.ENGINE_KWARGS))
        model, config = load(root, dtype, param_sharding=load_sharding(load_config(root), layout or parallel))
        if compression is not None:
            if config.is_encoder:
                raise ValueError(f"quantize={quantize!r} / sparsity={sparsity} apply to decoder models only")
            report = quantize_model(model, compression[0], sparsity=compression[1])
            logger.info("quantized: %s", report.summary())
        tokenizer = Tokenizer.from_pretrained(root) if (root / "tokenizer.json").is_file() else None
        sentence = read_sentence_config(root) if config.is_encoder else None
        return cls(model, config, tokenizer, sentence_config=sentence, model_path=str(root), parallel=parallel,
                   **engine_kwargs)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(getattr(self.model_config, "eos_token_ids", ()) or ())
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.eos_token_ids)
        return tuple(sorted(ids))

    @property
    def num_compiles(self) -> int:
        if self._embedder is not None:
            return self._embedder.num_compiles
        return 0 if self._runner is None else self._runner.num_compiles

    @property
    def scheduler(self) -> SchedulerView | None:
        return self._scheduler

    @property
    def runner(self) -> CompiledRunner | None:
        return self._runner

    @property
    def buckets(self) -> Any:
        """The step shapes (``batch.Buckets``) the runner compiles; None for an encoder."""
        return None if self._embedder is not None else self._buckets

    @property
    def embedder(self) -> Any:
        """The encoder's ``EmbeddingRunner`` (``embedding.py``); None for a decoder."""
        return self._embedder

    @property
    def num_planned_ahead(self) -> int:
        """Steps planned and dispatched while the previous step's ids were still on the device."""
        return 0 if self._loop is None else self._loop.num_planned_ahead

    @property
    def dispatch_counts(self) -> Any:
        """``DispatchCounts``: device batches, rows and tokens sent so far (every dp replica)."""
        from energon_jax.step_loop import DispatchCounts

        return DispatchCounts() if self._loop is None else self._loop.counts

    def warmup(self) -> int:
        """Compile the step for every bucket shape; returns the number of compiles so far.

        A progress bar (stderr, process 0) counts the shapes as they compile: a large model
        on a cold compilation cache can take minutes here, and silence looks like a hang.
        """
        if self._embedder is not None:
            return self._embedder.warmup()
        start = time.perf_counter()
        from energon_jax.batch import warmup_batches
        from energon_jax.parallel.runtime import warm_up_with_progress

        n = warm_up_with_progress(self._runner, warmup_batches(self._buckets))
        logger.info("warm-up: %d step shapes compiled in %.1fs", n, time.perf_counter() - start)
        return n

    # -- requests ---------------------------------------------------------------------

    def _encode(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text, but this model has no tokenizer.json: pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def check_request(self, prompt: PromptInput, params: SamplingParams | None) -> tuple[str | None, list[int]]:
        """Every check that can reject a request, without queueing it: ValueError naming the field."""
        if self._scheduler is None:
            raise ValueError(f"model {self.model_config.architecture} is an encoder: use embed(), not generate()")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r} needs a tokenizer to match text, and this model has none")
        text, ids = self._encode(prompt)
        ids = validate_prompt(
            ids, params, max_model_len=self.config.max_model_len, vocab_size=self.model_config.vocab_size
        )
        need = -(-(len(ids) + params.max_tokens - 1) // self.config.page_size)
        if need > self.config.num_pages - 1:
            raise ValueError(
                f"prompt length {len(ids)} + max_tokens={params.max_tokens} needs {need} KV pages "
                f"(page_size={self.config.page_size}) but the pool holds kv_cache_pages={self.config.num_pages} "
                "(page 0 reserved)"
            )
        return text, ids

    def _min_tokens_ban(self, params: SamplingParams) -> tuple[int, ...]:
        """The ids ``min_tokens`` keeps from being sampled (checked to fit the sampler's table)."""
        if params.min_tokens == 0:
            return ()
        from energon_jax.batch import MIN_TOKENS_BAN_WIDTH

        ban = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        if len(ban) > MIN_TOKENS_BAN_WIDTH:
            raise ValueError(
                f"min_tokens={params.min_tokens} holds back {len(ban)} stop ids (eos and stop_token_ids), "
                f"more than {MIN_TOKENS_BAN_WIDTH}"
            )
        return tuple(sorted(ban))

    def add_request(
        self, prompt: PromptInput, params: SamplingParams | None = None, *, request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> str:
        """Validate and queue one request; returns its id. Raises ValueError for bad input.

        ``cache_salt``: requests share prefix-cache pages only with requests of the same salt."""
        params = SamplingParams() if params is None else params
        validate_cache_salt(cache_salt)
        text, ids = self.check_request(prompt, params)
        rid = self._book.new_id() if request_id is None else str(request_id)
        if rid in self._book.live:
            raise ValueError(f"request_id={rid!r} is already in flight")
        request = Request(request_id=rid, prompt_token_ids=ids, params=params, prompt=text, cache_salt=cache_salt,
                          min_tokens_ban=self._min_tokens_ban(params))
        self._scheduler.add(request)  # raises ValueError when it can never fit
        self._book.track(request, self._book.tracker(request))
        return rid

    def abort(self, request_id: str) -> StreamDelta | None:
        """Stop a request now; its pages are back in the pool when this returns."""
        live = self._book.live.get(request_id)
        if live is None:
            return None
        self._scheduler.abort(request_id)
        return self._book.finish_delta(live, [], None, "abort", live.tracker.finish())

    # -- handing a request between servers (serving/disagg_role.py: prefill and decode roles) --
    def release(self, request_id: str) -> tuple[Request, list[int], str]:
        """Take a running request off this engine (no step may hold it: ``async_scheduling`` off);
        its pages stay allocated for the caller, which frees them once they are copied. Returns
        the request, and the ids and text of its output not yet emitted as a delta (deltas
        are emitted a step late; the one pending for it is dropped)."""
        request = self._scheduler.detach(request_id)  # RuntimeError when not running here
        live = self._book.live.pop(request_id)
        ids = list(request.output_token_ids[len(live.token_ids):])
        return request, ids, live.tracker.add(ids, finished=False)

    def adopt(self, request: Request) -> None:
        """Continue a request prefilled elsewhere: ``request`` is running, its ``pages`` come from
        this engine's pool and hold its first ``num_computed_tokens`` K/V, and its output so far
        (the first token) is in ``output_token_ids``; its text is not emitted again here."""
        request.min_tokens_ban = self._min_tokens_ban(request.params)
        tracker = self._book.tracker(request)
        tracker.add(list(request.output_token_ids), finished=False)  # the text the prefill server sent
        self._scheduler.attach(request)
        self._book.track(request, tracker, token_ids=request.output_token_ids)

    def has_unfinished(self) -> bool:
        return bool(self._book.live) or (self._loop is not None and self._loop.busy())

    def step(self) -> list[StreamDelta]:
        """Run one engine step; returns the deltas ready now (any request, any order).

        See ``step_loop.py``: with ``async_scheduling`` one step stays in flight across
        calls, and with ``pp > 1`` up to ``pp`` micro-batches do.
        """
        if self._loop is None:
            raise ValueError(f"model {self.model_config.architecture} is an encoder: use embed(), not step()")
        return self._loop.step(self._book.live.keys())

    def _process(self, deltas: Sequence[Any]) -> list[StreamDelta]:
        """The step loop's scheduler deltas as the user's StreamDeltas (``request_book.py``)."""
        return self._book.process(deltas, self._scheduler.finish)

    def take_output(self, rid: str) -> RequestOutput | None:
        """The finished request's output (once; None when unknown or not finished)."""
        return self._book.take(rid) if rid in self._book.done else None

    # -- the user API -----------------------------------------------------------------

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in input order."""
        prompt_list = as_prompt_list(prompts)
        params_list = as_params_list(sampling_params, len(prompt_list))
        rids = []
        try:
            for prompt, params in zip(prompt_list, params_list):
                rids.append(self.add_request(prompt, params))
        except Exception:
            for rid in rids:  # all or nothing: a bad prompt leaves no request behind
                self.abort(rid)
                self._book.done.pop(rid, None)
            raise
        pending = set(rids)
        bar = None
        if use_tqdm and len(rids) >= TQDM_MIN_PROMPTS:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rids), desc="generate", unit="req")
        try:
            while pending:
                for delta in self.step():
                    if delta.finished and delta.request_id in pending:
                        pending.discard(delta.request_id)
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [self._book.take(rid) for rid in rids]

    def stream(self, prompt: PromptInput, sampling_params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield this request's deltas as they are produced (text held back near stop strings)."""
        rid = self.add_request(prompt, sampling_params)
        try:
            while True:
                for delta in self.step():
                    if delta.request_id == rid:
                        if delta.finished:
                            self._book.done.pop(rid, None)
                        yield delta
                        if delta.finished:
                            return
        finally:
            if rid in self._book.live:  # the consumer stopped early
                self.abort(rid)
                self._book.done.pop(rid, None)

    def embed(
        self, texts: str | Sequence[str], normalize: bool | None = None, *, truncate: bool = False
    ) -> np.ndarray:
        """Pooled embeddings ``[len(texts), D]`` of an encoder checkpoint (float32).

        ``normalize=None`` follows the checkpoint (on when its sentence-transformers pipeline
        has a Normalize module). A text over the token limit is a ValueError, unless
        ``truncate=True`` cuts it to the limit (``embedding.py``)."""
        if self._embedder is None:
            raise ValueError(f"model {self.model_config.architecture} is a decoder: embed() needs an encoder (BERT)")
        return self._embedder.embed(texts, normalize=normalize, truncate=truncate)
