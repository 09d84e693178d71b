"""GPT-2 (``GPT2LMHeadModel``) in Flax NNX.

Glossary: ``T`` tokens, ``N`` heads, ``H`` head dim, ``D`` model dim, ``F`` MLP dim,
``V`` vocab, ``C`` the three projections q, k, v.

The architecture: learned absolute position embeddings added to the token embeddings,
pre-LayerNorm blocks ``h = x + attn(ln_1(x)); y = h + mlp(ln_2(h))``, a final
``ln_f``, and an output head tied to the token embedding (unless the config unties it).
Hugging Face stores GPT-2's projections as ``Conv1D`` whose weight is already
``[in, out]``, so nothing is transposed on load; ``c_attn`` packs q, k and v along its
output axis, which we keep packed as one ``[D, C, N, H]`` kernel (one matmul, and the
``heads`` axis stays shardable).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.activations import activation, check_activation
from models.config import ModelConfig, eos_ids
from models.layers import Embed, LayerNorm, Linear, attend, check_cache_layers, param, untied_head
from models.loading import WeightSpec
from pallas_kernels import KVCache, KVPages, PagedAttentionMetadata

ARCHITECTURES = ("GPT2LMHeadModel",)
# Skipped quietly when present: the causal-mask buffers older exports saved with each
# attention layer, and the copy of the tied head some exports keep.
HF_IGNORED = (r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight")


@dataclasses.dataclass(frozen=True)
class GPT2Config(ModelConfig):
    scale_attn_weights: bool = True
    # Divide the scores of layer ``i`` by ``i + 1`` as well (a GPT-2 training-stability option).
    scale_attn_by_inverse_layer_idx: bool = False


def config_from_hf(hf: dict) -> GPT2Config:
    """A ``GPT2Config`` from a ``config.json`` dict (GPT-2's own names or the generic aliases)."""
    if hf.get("add_cross_attention"):
        raise ValueError("config add_cross_attention=True is not supported (GPT-2 as a decoder of an encoder)")
    hidden = int(hf.get("n_embd", hf.get("hidden_size", 768)))
    heads = int(hf.get("n_head", hf.get("num_attention_heads", 12)))
    if hidden % heads:
        raise ValueError(f"config n_embd={hidden} must be a multiple of n_head={heads}")
    inner = hf.get("n_inner")
    return GPT2Config(
        architecture="GPT2LMHeadModel",
        vocab_size=int(hf.get("vocab_size", 50257)),
        hidden_size=hidden,
        num_layers=int(hf.get("n_layer", hf.get("num_hidden_layers", 12))),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(inner) if inner is not None else 4 * hidden,
        max_position_embeddings=int(hf.get("n_positions", hf.get("max_position_embeddings", 1024))),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        hidden_act=check_activation(hf.get("activation_function", "gelu_new"), field="activation_function"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
    )


class GPT2Attention(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        d, n, h = config.hidden_size, config.num_heads, config.head_dim
        self.qkv = param(rngs, (d, 3, n, h), ("embed", "qkv", "heads", "head_dim"), dtype)
        self.qkv_bias = param(rngs, (3, n, h), ("qkv", "heads", "head_dim"), dtype, init="zeros")
        self.o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), dtype)
        self.o_bias = param(rngs, (d,), ("embed",), dtype, init="zeros")
        scale = h**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.sm_scale = scale
        self.attention_implementation = config.attention_implementation

    def __call__(
        self,
        x: jax.Array,  # [T, D]
        positions: jax.Array,
        segment_ids: jax.Array,
        kv_pages: KVPages | None,
        attn_meta: PagedAttentionMetadata | None,
    ) -> tuple[jax.Array, KVPages | None]:
        qkv = jnp.einsum("TD,DCNH->CTNH", x, self.qkv[...].astype(x.dtype))
        qkv = qkv + self.qkv_bias[...].astype(x.dtype)[:, None]
        out, kv_pages = attend(
            qkv[0], qkv[1], qkv[2], segment_ids=segment_ids, positions=positions,
            kv_pages=kv_pages, attn_meta=attn_meta, sm_scale=self.sm_scale,
            implementation=self.attention_implementation,
        )  # [T, N, H]
        y = jnp.einsum("TNH,NHD->TD", out, self.o[...].astype(x.dtype)) + self.o_bias[...].astype(x.dtype)
        return y, kv_pages


class GPT2MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.fc = Linear(d, f, axes=("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.proj = Linear(f, d, axes=("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
        self.act = activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(self.act(self.fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.norm_eps
        self.ln_1 = LayerNorm(d, eps=eps, dtype=dtype, rngs=rngs)
        self.attn = GPT2Attention(config, layer_idx, dtype=dtype, rngs=rngs)
        self.ln_2 = LayerNorm(d, eps=eps, dtype=dtype, rngs=rngs)
        self.mlp = GPT2MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, segment_ids, kv_pages, attn_meta):
        a, kv_pages = self.attn(self.ln_1(x), positions, segment_ids, kv_pages, attn_meta)
        h = x + a
        return h + self.mlp(self.ln_2(h)), kv_pages


class GPT2LMHeadModel(nnx.Module):
    def __init__(self, config: GPT2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        d = config.hidden_size
        self.wte = Embed(config.vocab_size, d, dtype=dtype, rngs=rngs)
        self.wpe = Embed(config.max_position_embeddings, d, dtype=dtype, rngs=rngs, axes=(None, "embed"))
        self.layers = nnx.List([GPT2Block(config, i, dtype=dtype, rngs=rngs) for i in range(config.num_layers)])
        self.ln_f = LayerNorm(d, eps=config.norm_eps, dtype=dtype, rngs=rngs)
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
        check_cache_layers(kv_cache, self.config.num_layers)
        x = (self.wte(input_ids) + self.wpe(positions)).astype(self.dtype)  # [T, D]
        new_cache = []
        for i, block in enumerate(self.layers):
            x, pages = block(x, positions, segment_ids, None if kv_cache is None else kv_cache[i], attn_meta)
            new_cache.append(pages)
        x = self.ln_f(x)
        if logits_indices is not None:
            x = x[logits_indices]  # [B, D]
        logits = self.wte.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32), None if kv_cache is None else tuple(new_cache)



def _spec(name: str, path: tuple, **transforms) -> WeightSpec:
    # GPT2LMHeadModel saves "transformer.h.0...."; the original OpenAI conversions
    # (GPT2Model layout) save the same tensors without the prefix.
    return WeightSpec("transformer." + name, path, aliases=(name,), **transforms)


def hf_weight_map(config: GPT2Config) -> list[WeightSpec]:
    """Hugging Face tensor names -> NNX parameter paths (Conv1D weights are already ``[in, out]``)."""
    d, n, h = config.hidden_size, config.num_heads, config.head_dim
    specs = [
        _spec("wte.weight", ("wte", "embedding")),
        _spec("wpe.weight", ("wpe", "embedding")),
        _spec("ln_f.weight", ("ln_f", "scale")),
        _spec("ln_f.bias", ("ln_f", "bias")),
    ]
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), transpose=True))
    for i in range(config.num_layers):
        hf, nn_ = f"h.{i}.", ("layers", i)
        specs += [
            _spec(hf + "ln_1.weight", (*nn_, "ln_1", "scale")),
            _spec(hf + "ln_1.bias", (*nn_, "ln_1", "bias")),
            _spec(hf + "attn.c_attn.weight", (*nn_, "attn", "qkv"), reshape=(d, 3, n, h)),
            _spec(hf + "attn.c_attn.bias", (*nn_, "attn", "qkv_bias"), reshape=(3, n, h)),
            _spec(hf + "attn.c_proj.weight", (*nn_, "attn", "o"), reshape=(n, h, d)),
            _spec(hf + "attn.c_proj.bias", (*nn_, "attn", "o_bias")),
            _spec(hf + "ln_2.weight", (*nn_, "ln_2", "scale")),
            _spec(hf + "ln_2.bias", (*nn_, "ln_2", "bias")),
            _spec(hf + "mlp.c_fc.weight", (*nn_, "mlp", "fc", "kernel")),
            _spec(hf + "mlp.c_fc.bias", (*nn_, "mlp", "fc", "bias")),
            _spec(hf + "mlp.c_proj.weight", (*nn_, "mlp", "proj", "kernel")),
            _spec(hf + "mlp.c_proj.bias", (*nn_, "mlp", "proj", "bias")),
        ]
    return specs
