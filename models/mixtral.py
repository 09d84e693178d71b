"""Mixtral (``MixtralForCausalLM``): Llama blocks whose MLP is a top-k mixture of SwiGLU experts.

Glossary: ``T`` tokens, ``D`` model dim, ``F`` expert MLP dim, ``E`` experts, ``k``
experts per token, ``R = T * k`` routed (token, expert) pairs.

Routing as in Hugging Face: router logits ``x @ W_r``, softmax over all ``E`` experts in
float32, keep the top ``k``, renormalise their weights to sum to 1. The experts run
sorted, not dense: the ``R`` (token, expert) pairs are ordered by expert so that each
expert's rows are contiguous, one ``ragged_dot`` per projection multiplies every group by
its own expert's weights, and the weighted results are scattered back to their tokens.
The work is ``k / E`` of running every expert on every token, and the shapes are static
(``R`` is fixed by ``T``), so one compile serves any routing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import param
from models.llama import LlamaConfig, LlamaForCausalLM, attention_weight_map, common_fields, outer_weight_map
from models.loading import WeightSpec

ARCHITECTURES = ("MixtralForCausalLM",)
HF_IGNORED = (r"lm_head\.weight",)


@dataclasses.dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
    num_experts: int = 8
    num_experts_per_tok: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"config num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_local_experts="
                f"{self.num_experts}]"
            )


def config_from_hf(hf: dict) -> MixtralConfig:
    return MixtralConfig(
        **common_fields(hf, "MixtralForCausalLM"),
        num_experts=int(hf.get("num_local_experts", 8)),
        num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
    )


class MixtralMoE(nnx.Module):
    """Top-k routed SwiGLU experts: ``[T, D] -> [T, D]``."""

    def __init__(self, config: MixtralConfig, *, dtype, rngs: nnx.Rngs):
        e, d, f = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.top_k = e, config.num_experts_per_tok
        self.router = param(rngs, (d, e), ("embed", None), dtype)
        self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), dtype)
        self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), dtype)
        self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), dtype)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(weights [T, k] float32, experts [T, k] int32)`` for each token."""
        logits = jnp.dot(x, self.router[...].astype(x.dtype)).astype(jnp.float32)  # [T, E]
        probs = jax.nn.softmax(logits, axis=-1)
        weights, experts = jax.lax.top_k(probs, self.top_k)  # [T, k]
        return weights / jnp.sum(weights, axis=-1, keepdims=True), experts

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, D]
        t, d = x.shape
        weights, experts = self.route(x)
        flat_experts = experts.reshape(-1)  # [R]
        order = jnp.argsort(flat_experts, stable=True)  # [R], pairs grouped by expert
        token = order // self.top_k  # [R] token of each sorted pair
        group_sizes = jnp.bincount(flat_experts, length=self.num_experts).astype(jnp.int32)  # [E]
        xs = x[token]  # [R, D]
        gate = jax.lax.ragged_dot(xs, self.w_gate[...].astype(x.dtype), group_sizes)  # [R, F]
        up = jax.lax.ragged_dot(xs, self.w_up[...].astype(x.dtype), group_sizes)  # [R, F]
        y = jax.lax.ragged_dot(jax.nn.silu(gate) * up, self.w_down[...].astype(x.dtype), group_sizes)  # [R, D]
        y = y.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
        out = jnp.zeros((t, d), jnp.float32).at[token].add(y)  # [T, D]
        return out.astype(x.dtype)


class MixtralForCausalLM(LlamaForCausalLM):
    def __init__(self, config: MixtralConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(
            config, dtype=dtype, rngs=rngs, make_mlp=lambda c, dt, r: MixtralMoE(c, dtype=dt, rngs=r)
        )


def hf_weight_map(config: MixtralConfig) -> list[WeightSpec]:
    """Per-expert ``w1`` (gate), ``w3`` (up), ``w2`` (down) fill one slice of the stacked weights."""
    specs = outer_weight_map(config)
    for i in range(config.num_layers):
        hf, nn = f"model.layers.{i}.", ("layers", i)
        specs += attention_weight_map(config, hf, nn)
        moe, path = hf + "block_sparse_moe.", (*nn, "mlp")
        specs.append(
            WeightSpec(moe + "gate.weight", (*path, "router"), transpose=True, aliases=(hf + "mlp.gate.weight",))
        )
        for e in range(config.num_experts):
            for hf_name, ours in (("w1", "w_gate"), ("w3", "w_up"), ("w2", "w_down")):
                specs.append(WeightSpec(f"{moe}experts.{e}.{hf_name}.weight", (*path, ours), transpose=True, index=e))
    return specs
