"""A decoder cut into pieces that can live on different devices: embedding, layers, head.

Pipeline stages (``pipeline.py``) and layer offloading (``memory_pool.py``) both need
to run a contiguous range of a model's layers on their own, with only those layers'
weights at hand. ``decoder_parts(model)`` splits a model into NNX ``(graphdef, state)``
pairs, one for the embedding, one per layer, one for the final norm and one for the
head (the embedding again when tied), and ``run_*`` functions apply them inside a
jitted function, in exactly the order the model's own ``__call__`` does, so a model
run piecewise gives the same numbers as run whole.

Supported families: everything built on ``models.llama.LlamaForCausalLM`` (Llama,
Mistral, Qwen2, Mixtral). Another family needs its own ``decoder_parts`` branch here
(or, better, the model exposing ``embed / layers / head`` itself).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from energon_jax.sampling import sample

Piece = tuple[Any, Any]  # (nnx graphdef, nnx state)


@dataclasses.dataclass(frozen=True)
class DecoderParts:
    """Graphdefs and states of a decoder's pieces (see the module docstring)."""

    config: Any
    dtype: Any
    embed: Piece
    layers: tuple[Piece, ...]
    norm: Piece
    head: Piece | None  # None: the output head is the (tied) embedding

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def decoder_parts(model: nnx.Module) -> DecoderParts:
    from models.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(
            f"model {type(model).__name__} cannot be split into stages yet; supported: LlamaForCausalLM, "
            "MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM"
        )
    return DecoderParts(
        config=model.config,
        dtype=model.dtype,
        embed=nnx.split(model.embed_tokens),
        layers=tuple(nnx.split(layer) for layer in model.layers),
        norm=nnx.split(model.norm),
        head=None if model.lm_head is None else nnx.split(model.lm_head),
    )


def layer_bounds(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` layer ranges, as even as possible, earlier stages larger."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"pp={num_stages} must be in [1, num_layers={num_layers}]")
    base, extra = divmod(num_layers, num_stages)
    bounds, start = [], 0
    for s in range(num_stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def rope_inv_freq(parts: DecoderParts) -> jax.Array:
    from models.layers import rope_inv_freq

    c = parts.config
    return rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)  # [H / 2]


def run_embed(parts: DecoderParts, embed_state: Any, input_ids: jax.Array) -> jax.Array:
    embed = nnx.merge(parts.embed[0], embed_state)
    return embed(input_ids).astype(parts.dtype)  # [T, D]


def run_layers(parts: DecoderParts, first: int, layer_states: Any, kv_pages: tuple, x: jax.Array, batch: Any):
    """Layers ``first, first + 1, ...`` (one state and one KVPages each) over ``x [T, D]``."""
    new_pages = []
    for i, (state, pages) in enumerate(zip(layer_states, kv_pages)):
        x, pages = run_layer(parts, parts.layers[first + i][0], state, pages, x, batch)
        new_pages.append(pages)
    return x, tuple(new_pages)


def run_layer(parts: DecoderParts, graphdef: Any, state: Any, pages: Any, x: jax.Array, batch: Any):
    """One layer (``graphdef`` + ``state``) over ``x [T, D]``; returns ``(x, pages)``."""
    layer = nnx.merge(graphdef, state)
    return layer(x, batch.positions, batch.segment_ids, rope_inv_freq(parts), pages, batch.attn)


def run_head(parts: DecoderParts, norm_state: Any, head_state: Any, x: jax.Array, batch: Any, tables: Any = None):
    """Final norm, the rows' last tokens, logits ``[B, V]`` float32, then on-device sampling
    (penalty counts from ``tables``, ``sampling.PenaltyTables``, when the runner keeps them)."""
    return run_head_rows(parts, norm_state, head_state, x[batch.logits_indices], batch.sampling, tables)


def run_head_rows(parts: DecoderParts, norm_state: Any, head_state: Any, x: jax.Array, sampling: Any,
                  tables: Any = None):
    """``run_head`` on the rows' last tokens ``x [B, D]`` already gathered (the norm is per token)."""
    x = nnx.merge(parts.norm[0], norm_state)(x)  # [B, D]
    if parts.head is None:
        logits = nnx.merge(parts.embed[0], head_state).attend(x)
    else:
        logits = nnx.merge(parts.head[0], head_state)(x)
    return sample(logits.astype(jnp.float32), sampling, tables)


def head_piece(parts: DecoderParts) -> Piece:
    """The piece the head runs with: the LM head, or the embedding when they are tied."""
    return parts.embed if parts.head is None else parts.head
