"""Engine sizes and the normalisation of what users pass to ``Engine`` / ``generate``.

``EngineConfig`` is the frozen record of the runtime's sizes; ``engine_config`` fills in
defaults from the model (``max_model_len`` from the model, a KV pool from a page count,
a byte budget, or room for ``max_num_seqs`` full sequences). ``as_prompt_list`` and
``as_params_list`` accept the shapes ``generate`` takes (a str, a list of str, a list of
ids, a list of lists; one ``SamplingParams`` or one per prompt).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from energon_jax.request import SamplingParams
from energon_jax.sliding_window import pages_held_at_once

PromptInput = str | Sequence[int]


def demo_model_path() -> Path:
    """The embedded demo checkpoint shipped inside the package (``energon_jax/demo``)."""
    path = Path(str(importlib.resources.files("energon_jax") / "demo"))
    if not (path / "config.json").is_file():
        raise ValueError(f"the embedded demo model is missing: {str(path)!r} has no config.json")
    return path


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes of the runtime; ``Engine.from_pretrained`` fills in the defaults from the model."""

    max_model_len: int
    page_size: int
    num_pages: int
    max_num_seqs: int
    max_num_batched_tokens: int
    static_batching: bool = False

    def __post_init__(self) -> None:
        for name in ("max_model_len", "page_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_pages < 2:
            raise ValueError(f"kv_cache_pages={self.num_pages} must be >= 2 (page 0 is the reserved null page)")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs={self.max_num_seqs} "
                "(every running sequence decodes one token per step)"
            )


def param_dtype(model: Any) -> jnp.dtype:
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    floats = [x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    return floats[0] if floats else jnp.dtype(jnp.float32)


def engine_config(
    model_config: Any, *, max_model_len, page_size, kv_cache_pages, kv_cache_bytes, max_num_seqs,
    max_num_batched_tokens, static_batching, kv_dtype,
) -> EngineConfig:
    from energon_jax.kv_cache import kv_cache_pages_for_bytes

    limit = model_config.max_position_embeddings
    if max_model_len is None:
        max_model_len = limit
    if max_model_len > limit:
        raise ValueError(f"{max_model_len=} must be <= the model's max_position_embeddings={limit}")
    if page_size < 1:
        raise ValueError(f"{page_size=} must be >= 1")
    if kv_cache_pages is not None and kv_cache_bytes is not None:
        raise ValueError("give kv_cache_pages or kv_cache_bytes, not both")
    if kv_cache_bytes is not None:
        num_pages = kv_cache_pages_for_bytes(
            kv_cache_bytes, model_config.num_layers, page_size, model_config.num_kv_heads, model_config.head_dim,
            kv_dtype,
        )
    elif kv_cache_pages is not None:
        num_pages = kv_cache_pages
    else:  # room for every sequence at full length (or its sliding window), plus the null page
        num_pages = 1 + max_num_seqs * pages_held_at_once(
            max_model_len, page_size, getattr(model_config, "kv_window", None), max_num_batched_tokens)
    check_pool_holds_one_sequence(num_pages, page_size, max_model_len, window=getattr(model_config, "kv_window", None),
                                  max_num_batched_tokens=max_num_batched_tokens)
    return EngineConfig(
        max_model_len=max_model_len, page_size=page_size, num_pages=num_pages, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, static_batching=static_batching,
    )


def check_pool_holds_one_sequence(
    num_pages: int, page_size: int, max_model_len: int, *, window: int | None = None,
    max_num_batched_tokens: int | None = None,
) -> None:
    """Refuse a pool in which one ``max_model_len`` sequence cannot fit (it could never finish);
    with a sliding window on every layer (``window``), one that cannot hold the pages such a
    sequence keeps at once (``sliding_window.pages_held_at_once``)."""
    per_seq = -(-max_model_len // page_size)
    held = ""
    if window is not None and max_num_batched_tokens is not None:
        per_seq = pages_held_at_once(max_model_len, page_size, window, max_num_batched_tokens)
        held = f" held at once with sliding window {window}"
    if num_pages - 1 < per_seq:
        raise ValueError(
            f"the KV pool holds {num_pages - 1} pages x {page_size=} = {(num_pages - 1) * page_size} tokens, "
            f"fewer than one sequence of {max_model_len=} ({per_seq} pages{held}): give a larger kv_cache_pages "
            f"(>= {per_seq + 1}) or kv_cache_bytes, or a smaller max_model_len"
        )


def _is_token_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, (int, np.integer)) for t in x)


def as_prompt_list(prompts: Any) -> list[PromptInput]:
    if isinstance(prompts, str) or _is_token_list(prompts):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a str, a list of str, a list of token ids or a list of lists; got {prompts!r}")
    for i, p in enumerate(prompts):
        if not (isinstance(p, str) or isinstance(p, (list, tuple))):
            raise ValueError(f"prompts[{i}] must be a str or a list of token ids, got {type(p).__name__}")
    return list(prompts)


def as_params_list(params: Any, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts; give one or one per prompt")
    return params
