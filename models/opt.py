"""OPT (``OPTForCausalLM``) in Flax NNX.

Glossary: ``T`` tokens, ``N`` heads, ``H`` head dim, ``D`` model dim, ``W`` word
embedding dim (``word_embed_proj_dim``), ``F`` MLP dim, ``V`` vocab.

What sets OPT apart from GPT-2:

- learned positions are looked up at ``position + 2`` (fairseq reserved the first two
  rows), so the table has ``max_position_embeddings + 2`` rows;
- ``do_layer_norm_before`` picks pre-LN blocks (125m, 1.3b and up) or post-LN blocks
  (350m): ``h = ln(x + attn(x))``; only pre-LN models have a final layer norm;
- when ``word_embed_proj_dim != hidden_size`` (350m) the token embeddings are ``[V, W]``
  and ``project_in [W, D]`` / ``project_out [D, W]`` sit around the decoder; the output
  head is tied to the ``[V, W]`` embedding;
- ``enable_bias`` switches every projection bias; the MLP is ``fc2(relu(fc1(x)))``.
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

ARCHITECTURES = ("OPTForCausalLM",)
# Tied checkpoints often keep a copy of the head (it is the embedding): skip it quietly.
HF_IGNORED = (r"lm_head\.weight",)

# fairseq's learned positional embedding skips the first two rows.
POSITION_OFFSET = 2
# torch.nn.LayerNorm's default; OPT's config has no epsilon field.
LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class OPTConfig(ModelConfig):
    word_embed_proj_dim: int = 0  # 0 means hidden_size
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    enable_bias: bool = True

    @property
    def word_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def has_projection(self) -> bool:
        return self.word_dim != self.hidden_size


def config_from_hf(hf: dict) -> OPTConfig:
    hidden = int(hf.get("hidden_size", 768))
    heads = int(hf.get("num_attention_heads", 12))
    if hidden % heads:
        raise ValueError(f"config hidden_size={hidden} must be a multiple of num_attention_heads={heads}")
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ValueError("config layer_norm_elementwise_affine=False is not supported (layer norms without weights)")
    pre_ln = bool(hf.get("do_layer_norm_before", True))
    word_dim = hf.get("word_embed_proj_dim")
    return OPTConfig(
        architecture="OPTForCausalLM",
        vocab_size=int(hf.get("vocab_size", 50272)),
        hidden_size=hidden,
        num_layers=int(hf.get("num_hidden_layers", 12)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(hf.get("ffn_dim", 3072)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=LAYER_NORM_EPS,
        hidden_act=check_activation(hf.get("activation_function", "relu"), field="activation_function"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        word_embed_proj_dim=int(word_dim) if word_dim is not None else hidden,
        do_layer_norm_before=pre_ln,
        # Fine-tunes from before transformers 4.20 dropped the final norm (`_remove_final_layer_norm`).
        final_layer_norm=pre_ln and not hf.get("_remove_final_layer_norm", False),
        enable_bias=bool(hf.get("enable_bias", True)),
    )


class OPTAttention(nnx.Module):
    def __init__(self, config: OPTConfig, *, dtype, rngs: nnx.Rngs):
        d, n, h = config.hidden_size, config.num_heads, config.head_dim
        self.q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), dtype)
        self.k = param(rngs, (d, n, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.v = param(rngs, (d, n, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), dtype)
        if config.enable_bias:
            self.q_bias = param(rngs, (n, h), ("heads", "head_dim"), dtype, init="zeros")
            self.k_bias = param(rngs, (n, h), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias = param(rngs, (n, h), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.o_bias = param(rngs, (d,), ("embed",), dtype, init="zeros")
        else:
            self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
        self.attention_implementation = config.attention_implementation

    def __call__(
        self,
        x: jax.Array,  # [T, D]
        positions: jax.Array,
        segment_ids: jax.Array,
        kv_pages: KVPages | None,
        attn_meta: PagedAttentionMetadata | None,
    ) -> tuple[jax.Array, KVPages | None]:
        q = _project(x, self.q, self.q_bias)  # [T, N, H]
        k = _project(x, self.k, self.k_bias)
        v = _project(x, self.v, self.v_bias)
        out, kv_pages = attend(
            q, k, v, segment_ids=segment_ids, positions=positions, kv_pages=kv_pages, attn_meta=attn_meta,
            implementation=self.attention_implementation,
        )
        y = jnp.einsum("TNH,NHD->TD", out, self.o[...].astype(x.dtype))
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(x.dtype)
        return y, kv_pages


def _project(x: jax.Array, kernel: nnx.Param, bias: nnx.Param | None) -> jax.Array:
    y = jnp.einsum("TD,DNH->TNH", x, kernel[...].astype(x.dtype))
    return y if bias is None else y + bias[...].astype(x.dtype)


class OPTDecoderLayer(nnx.Module):
    def __init__(self, config: OPTConfig, *, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.pre_ln = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, dtype=dtype, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(d, eps=config.norm_eps, dtype=dtype, rngs=rngs)
        self.fc1 = Linear(d, f, axes=("embed", "mlp"), use_bias=config.enable_bias, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(f, d, axes=("mlp", "embed"), use_bias=config.enable_bias, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(d, eps=config.norm_eps, dtype=dtype, rngs=rngs)
        self.act = activation(config.hidden_act)

    def __call__(self, x, positions, segment_ids, kv_pages, attn_meta):
        if self.pre_ln:
            a, kv_pages = self.self_attn(self.self_attn_layer_norm(x), positions, segment_ids, kv_pages, attn_meta)
            h = x + a
            return h + self.fc2(self.act(self.fc1(self.final_layer_norm(h)))), kv_pages
        # Post-LN (opt-350m): normalise after each residual sum.
        a, kv_pages = self.self_attn(x, positions, segment_ids, kv_pages, attn_meta)
        h = self.self_attn_layer_norm(x + a)
        return self.final_layer_norm(h + self.fc2(self.act(self.fc1(h)))), kv_pages


class OPTForCausalLM(nnx.Module):
    def __init__(self, config: OPTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        d, w = config.hidden_size, config.word_dim
        self.embed_tokens = Embed(config.vocab_size, w, dtype=dtype, rngs=rngs)
        self.embed_positions = Embed(
            config.max_position_embeddings + POSITION_OFFSET, d, dtype=dtype, rngs=rngs, axes=(None, "embed")
        )
        proj = config.has_projection
        # The projections map between two model-width spaces; neither axis is sharded.
        self.project_in = Linear(w, d, axes=(None, "embed"), use_bias=False, dtype=dtype, rngs=rngs) if proj else None
        self.project_out = Linear(d, w, axes=("embed", None), use_bias=False, dtype=dtype, rngs=rngs) if proj else None
        self.layers = nnx.List([OPTDecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.final_layer_norm = (
            LayerNorm(d, eps=config.norm_eps, dtype=dtype, rngs=rngs) if config.final_layer_norm else None
        )
        self.lm_head = untied_head(config, w, dtype=dtype, rngs=rngs)

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
        x = self.embed_tokens(input_ids).astype(self.dtype)  # [T, W]
        if self.project_in is not None:
            x = self.project_in(x)  # [T, D]
        x = x + self.embed_positions(positions + POSITION_OFFSET).astype(self.dtype)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, pages = layer(x, positions, segment_ids, None if kv_cache is None else kv_cache[i], attn_meta)
            new_cache.append(pages)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if logits_indices is not None:
            x = x[logits_indices]  # [B, D]
        if self.project_out is not None:
            x = self.project_out(x)  # [., W]
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32), None if kv_cache is None else tuple(new_cache)


def _decoder_aliases(specs: list[WeightSpec]) -> list[WeightSpec]:
    # OPTForCausalLM saves "model.decoder...."; exports of the bare OPTModel/decoder omit "model.".
    return [
        dataclasses.replace(s, aliases=(s.hf_name.removeprefix("model."),)) if s.hf_name.startswith("model.") else s
        for s in specs
    ]


def hf_weight_map(config: OPTConfig) -> list[WeightSpec]:
    """Hugging Face tensor names -> NNX parameter paths (``nn.Linear`` weights are ``[out, in]``)."""
    d, n, h = config.hidden_size, config.num_heads, config.head_dim
    p = "model.decoder."
    specs = [
        WeightSpec(p + "embed_tokens.weight", ("embed_tokens", "embedding")),
        WeightSpec(p + "embed_positions.weight", ("embed_positions", "embedding")),
    ]
    if config.has_projection:
        specs += [
            WeightSpec(p + "project_in.weight", ("project_in", "kernel"), transpose=True),
            WeightSpec(p + "project_out.weight", ("project_out", "kernel"), transpose=True),
        ]
    if config.final_layer_norm:
        specs += [
            WeightSpec(p + "final_layer_norm.weight", ("final_layer_norm", "scale")),
            WeightSpec(p + "final_layer_norm.bias", ("final_layer_norm", "bias")),
        ]
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), transpose=True))
    for i in range(config.num_layers):
        hf, nn_ = f"{p}layers.{i}.", ("layers", i)
        for name in ("q", "k", "v"):
            specs.append(
                WeightSpec(f"{hf}self_attn.{name}_proj.weight", (*nn_, "self_attn", name), transpose=True,
                           reshape=(d, n, h))
            )
        specs.append(WeightSpec(hf + "self_attn.out_proj.weight", (*nn_, "self_attn", "o"), transpose=True,
                                reshape=(n, h, d)))
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            specs += [
                WeightSpec(f"{hf}{norm}.weight", (*nn_, norm, "scale")),
                WeightSpec(f"{hf}{norm}.bias", (*nn_, norm, "bias")),
            ]
        specs += [
            WeightSpec(hf + "fc1.weight", (*nn_, "fc1", "kernel"), transpose=True),
            WeightSpec(hf + "fc2.weight", (*nn_, "fc2", "kernel"), transpose=True),
        ]
        if config.enable_bias:
            for name in ("q", "k", "v"):
                specs.append(
                    WeightSpec(f"{hf}self_attn.{name}_proj.bias", (*nn_, "self_attn", f"{name}_bias"), reshape=(n, h))
                )
            specs += [
                WeightSpec(hf + "self_attn.out_proj.bias", (*nn_, "self_attn", "o_bias")),
                WeightSpec(hf + "fc1.bias", (*nn_, "fc1", "bias")),
                WeightSpec(hf + "fc2.bias", (*nn_, "fc2", "bias")),
            ]
    return _decoder_aliases(specs)
