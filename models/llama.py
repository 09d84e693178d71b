"""Llama (``LlamaForCausalLM``), also serving Mistral and Qwen2, in Flax NNX.

Glossary: ``T`` tokens, ``N`` query heads, ``K`` KV heads, ``H`` head dim, ``D`` model
dim, ``F`` MLP dim, ``V`` vocab.

One block is ``h = x + attn(rms_norm(x)); y = h + mlp(rms_norm(h))`` with grouped-query
attention (``N % K == 0``), rotary embeddings (plain, ``linear`` or ``llama3`` scaled)
and a SwiGLU MLP ``down(silu(gate(x)) * up(x))``. The three architectures differ only
in config: Qwen2 has q/k/v biases, Llama may have ``attention_bias`` (q/k/v/o) and
``mlp_bias``, any of them may tie the output head to the token embedding or set an
explicit ``head_dim``.

Sliding-window attention follows transformers (``layer_windows_from_hf``): Mistral and
Mixtral window every layer when ``sliding_window`` is set; Qwen2 only with
``use_sliding_window``, and then the layers its ``layer_types`` mark "sliding_attention"
(by default those from ``max_window_layers`` on). A windowed layer's queries see their
``W`` latest positions, in every attention path (``models.layers.attend``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig, RopeScaling, eos_ids
from models.layers import (
    Embed,
    Linear,
    RMSNorm,
    apply_rope,
    attend,
    check_cache_layers,
    rope_inv_freq,
    untied_head,
)
from models.loading import WeightSpec
from pallas_kernels import KVCache, KVPages, PagedAttentionMetadata

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Some tied checkpoints still carry a copy of the head; it is the embedding, so skip it quietly.
HF_IGNORED = (r"lm_head\.weight",)
SWIGLU_ACTS = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False


def rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling)`` from either transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` fields."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "rope_theta" not in params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"config rope_parameters per layer type {sorted(params)} is not supported")
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        return theta, RopeScaling.from_hf(params)
    return float(hf.get("rope_theta", 10000.0)), RopeScaling.from_hf(hf.get("rope_scaling"))


# Architectures whose transformers implementation windows every layer when ``sliding_window`` is set.
WINDOW_EVERY_LAYER = ("MistralForCausalLM", "MixtralForCausalLM")
LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows_from_hf(hf: dict, architecture: str) -> tuple[int | None, ...]:
    """Each layer's attention window as transformers (5.x) applies it; ``()`` when none has one.

    Mistral / Mixtral: every layer, whenever ``sliding_window`` is not null. Qwen2: only with
    ``use_sliding_window`` (default false), on the layers ``layer_types`` marks
    "sliding_attention" (when absent: layers ``i >= max_window_layers``, default 28). Llama
    has no window (transformers ignores the field there).
    """
    window = hf.get("sliding_window")
    num_layers = int(hf["num_hidden_layers"])
    if architecture == "Qwen2ForCausalLM":
        if not hf.get("use_sliding_window", False):
            window = None
    elif architecture not in WINDOW_EVERY_LAYER:
        return ()
    if window is None:
        return ()
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"config sliding_window={window!r} must be an integer >= 1 or null")
    if architecture in WINDOW_EVERY_LAYER:
        return (window,) * num_layers
    types = hf.get("layer_types")
    if types is None:
        first = int(hf.get("max_window_layers", 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"config layer_types={types!r} must list one of {LAYER_TYPES} for each of "
                         f"num_hidden_layers={num_layers}")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return windows if any(w is not None for w in windows) else ()


def common_fields(hf: dict, architecture: str) -> dict:
    """The ``ModelConfig`` fields Llama-like configs share (Mixtral reuses this)."""
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hidden // heads
    act = hf.get("hidden_act", "silu")
    if act not in SWIGLU_ACTS:
        raise ValueError(f"config hidden_act={act!r} is not supported for {architecture}; supported: {SWIGLU_ACTS}")
    theta, scaling = rope_from_hf(hf)
    return dict(
        architecture=architecture,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        layer_windows=layer_windows_from_hf(hf, architecture),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        hidden_act="silu",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        rope_theta=theta,
        rope_scaling=scaling,
    )


def config_from_hf(hf: dict) -> LlamaConfig:
    archs = [a for a in hf.get("architectures") or [] if a in ARCHITECTURES]
    arch = archs[0] if archs else "LlamaForCausalLM"
    fields = common_fields(hf, arch)
    if arch == "Qwen2ForCausalLM":
        # Qwen2 always has q/k/v biases and never an o bias.
        bias = dict(qkv_bias=True, o_bias=False, mlp_bias=False)
    else:
        attention_bias = bool(hf.get("attention_bias", False))
        bias = dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    return LlamaConfig(**fields, **bias)


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, sliding_window: int | None = None):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.attention_implementation = config.attention_implementation
        self.sliding_window = sliding_window  # this layer's window (None: full attention)
        self.q_proj = Linear(d, n * h, axes=("embed", "heads"), use_bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, k * h, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, k * h, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(n * h, d, axes=("heads", "embed"), use_bias=config.o_bias, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,  # [T, D]
        positions: jax.Array,  # [T]
        segment_ids: jax.Array,  # [T]
        inv_freq: jax.Array,  # [H / 2]
        kv_pages: KVPages | None,
        attn_meta: PagedAttentionMetadata | None,
    ) -> tuple[jax.Array, KVPages | None]:
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, self.num_heads, self.head_dim)  # [T, N, H]
        k = self.k_proj(x).reshape(t, self.num_kv_heads, self.head_dim)  # [T, K, H]
        v = self.v_proj(x).reshape(t, self.num_kv_heads, self.head_dim)  # [T, K, H]
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        out, kv_pages = attend(
            q, k, v, segment_ids=segment_ids, positions=positions, kv_pages=kv_pages, attn_meta=attn_meta,
            sliding_window=self.sliding_window, implementation=self.attention_implementation,
        )  # [T, N, H]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim)), kv_pages


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), use_bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, D] -> [T, D]
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
    """One decoder layer; ``mlp`` is any ``[T, D] -> [T, D]`` module (Mixtral passes its MoE)."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, mlp: nnx.Module | None = None,
                 sliding_window: int | None = None):
        d, eps = config.hidden_size, config.norm_eps
        self.input_layernorm = RMSNorm(d, eps=eps, dtype=dtype, rngs=rngs)
        self.self_attn = LlamaAttention(config, dtype=dtype, rngs=rngs, sliding_window=sliding_window)
        self.post_attention_layernorm = RMSNorm(d, eps=eps, dtype=dtype, rngs=rngs)
        self.mlp = mlp if mlp is not None else LlamaMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, segment_ids, inv_freq, kv_pages, attn_meta):
        a, kv_pages = self.self_attn(self.input_layernorm(x), positions, segment_ids, inv_freq, kv_pages, attn_meta)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv_pages


class LlamaForCausalLM(nnx.Module):
    """The decoder; ``make_mlp(config, dtype, rngs)`` lets Mixtral swap in its experts."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, make_mlp=None):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        d = config.hidden_size
        self.embed_tokens = Embed(config.vocab_size, d, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([
            LlamaBlock(config, dtype=dtype, rngs=rngs, mlp=None if make_mlp is None else make_mlp(config, dtype, rngs),
                       sliding_window=config.sliding_window(i))
            for i in range(config.num_layers)
        ])
        self.norm = RMSNorm(d, eps=config.norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head = untied_head(config, d, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,  # [T] int32
        positions: jax.Array,  # [T] int32
        segment_ids: jax.Array,  # [T] int32, -1 for padding
        kv_cache: KVCache | None = None,
        attn_meta: PagedAttentionMetadata | None = None,
        logits_indices: jax.Array | None = None,  # [B] int32
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        check_cache_layers(kv_cache, cfg.num_layers)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # [H / 2]
        x = self.embed_tokens(input_ids).astype(self.dtype)  # [T, D]
        new_cache = []
        for i, layer in enumerate(self.layers):
            pages = None if kv_cache is None else kv_cache[i]
            x, pages = layer(x, positions, segment_ids, inv_freq, pages, attn_meta)
            new_cache.append(pages)
        x = self.norm(x)
        if logits_indices is not None:
            x = x[logits_indices]  # [B, D]
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)  # [T or B, V]
        return logits.astype(jnp.float32), None if kv_cache is None else tuple(new_cache)


# The same module serves all three architectures (the loader looks classes up by name).
MistralForCausalLM = LlamaForCausalLM
Qwen2ForCausalLM = LlamaForCausalLM


def attention_weight_map(config: LlamaConfig, hf: str, nn: tuple) -> list[WeightSpec]:
    """Specs for one layer's ``self_attn`` and norms (shared with Mixtral)."""
    specs = [
        WeightSpec(hf + "input_layernorm.weight", (*nn, "input_layernorm", "scale")),
        WeightSpec(hf + "post_attention_layernorm.weight", (*nn, "post_attention_layernorm", "scale")),
    ]
    for name in ("q", "k", "v", "o"):
        path = (*nn, "self_attn", f"{name}_proj")
        specs.append(WeightSpec(f"{hf}self_attn.{name}_proj.weight", (*path, "kernel"), transpose=True))
        if (config.qkv_bias and name != "o") or (config.o_bias and name == "o"):
            specs.append(WeightSpec(f"{hf}self_attn.{name}_proj.bias", (*path, "bias")))
    return specs


def outer_weight_map(config: LlamaConfig) -> list[WeightSpec]:
    """Embedding, final norm and head (shared with Mixtral)."""
    specs = [
        WeightSpec("model.embed_tokens.weight", ("embed_tokens", "embedding")),
        WeightSpec("model.norm.weight", ("norm", "scale")),
    ]
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), transpose=True))
    return specs


def hf_weight_map(config: LlamaConfig) -> list[WeightSpec]:
    """Hugging Face tensor names -> NNX parameter paths (torch ``Linear`` weights are transposed)."""
    specs = outer_weight_map(config)
    for i in range(config.num_layers):
        hf, nn = f"model.layers.{i}.", ("layers", i)
        specs += attention_weight_map(config, hf, nn)
        for name in ("gate", "up", "down"):
            path = (*nn, "mlp", f"{name}_proj")
            specs.append(WeightSpec(f"{hf}mlp.{name}_proj.weight", (*path, "kernel"), transpose=True))
            if config.mlp_bias:
                specs.append(WeightSpec(f"{hf}mlp.{name}_proj.bias", (*path, "bias")))
    return specs
