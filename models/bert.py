"""BERT (``BertModel``) as an encoder for embeddings, in Flax NNX.

Glossary: ``T`` tokens, ``B`` sequences (segments), ``N`` heads, ``H`` head dim, ``D``
model dim, ``F`` MLP dim, ``V`` vocab.

The encoder reads one packed, padding-free batch like the decoders do, ``input_ids [T]``,
``positions [T]``, ``segment_ids [T]`` (-1 for bucket padding), and returns the final
hidden states ``[T, D]``; attention is bidirectional inside each segment. Embeddings are
word + position + token type, then a LayerNorm; every block is post-LN:
``h = ln(x + attn(x)); y = ln(h + mlp(h))``.

Sentence embeddings come from pooling the hidden states of each segment
(``models/pooling.py``: CLS, mean, max, last token, read from a sentence-transformers
``1_Pooling/config.json`` when the checkpoint has one). The BERT pooler head
(``pooler.dense`` + tanh) is not part of the encoder: sentence-transformers does not use
it, and its weights, when present, are reported as unexpected and skipped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.activations import activation, check_activation
from models.config import ModelConfig, eos_ids
from models.layers import Embed, LayerNorm, Linear, attend, param
from models.loading import WeightSpec
from models.pooling import PoolingConfig, cls_pool, mean_pool, pool, read_pooling_config

ARCHITECTURES = ("BertModel",)
# Not part of the encoder (see the module docstring): the pooler head, pre-training heads
# and the position-id buffer older exports saved. Skipped quietly.
HF_IGNORED = (r"(bert\.)?pooler\..*", r"cls\..*", r"(bert\.)?embeddings\.position_ids")

__all__ = [
    "ARCHITECTURES",
    "BertConfig",
    "BertModel",
    "PoolingConfig",
    "cls_pool",
    "config_from_hf",
    "hf_weight_map",
    "mean_pool",
    "pool",
    "read_pooling_config",
]


@dataclasses.dataclass(frozen=True)
class BertConfig(ModelConfig):
    type_vocab_size: int = 2


def config_from_hf(hf: dict) -> BertConfig:
    hidden = int(hf.get("hidden_size", 768))
    heads = int(hf.get("num_attention_heads", 12))
    if hidden % heads:
        raise ValueError(f"config hidden_size={hidden} must be a multiple of num_attention_heads={heads}")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("config is_decoder/add_cross_attention=True is not supported: BertModel serves as an encoder")
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ValueError(f"config position_embedding_type={pos_type!r} is not supported; supported: 'absolute'")
    return BertConfig(
        architecture="BertModel",
        vocab_size=int(hf.get("vocab_size", 30522)),
        hidden_size=hidden,
        num_layers=int(hf.get("num_hidden_layers", 12)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(hf.get("intermediate_size", 3072)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        hidden_act=check_activation(hf.get("hidden_act", "gelu")),
        is_encoder=True,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
    )


class BertSelfAttention(nnx.Module):
    def __init__(self, config: BertConfig, *, dtype, rngs: nnx.Rngs):
        d, n, h = config.hidden_size, config.num_heads, config.head_dim
        self.q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), dtype)
        self.k = param(rngs, (d, n, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.v = param(rngs, (d, n, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.q_bias = param(rngs, (n, h), ("heads", "head_dim"), dtype, init="zeros")
        self.k_bias = param(rngs, (n, h), ("kv_heads", "head_dim"), dtype, init="zeros")
        self.v_bias = param(rngs, (n, h), ("kv_heads", "head_dim"), dtype, init="zeros")
        self.o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), dtype)
        self.o_bias = param(rngs, (d,), ("embed",), dtype, init="zeros")

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        def project(kernel, bias):  # [T, D] -> [T, N, H]
            return jnp.einsum("TD,DNH->TNH", x, kernel[...].astype(x.dtype)) + bias[...].astype(x.dtype)

        q, k, v = project(self.q, self.q_bias), project(self.k, self.k_bias), project(self.v, self.v_bias)
        out, _ = attend(
            q, k, v, segment_ids=segment_ids, positions=positions, kv_pages=None, attn_meta=None, causal=False
        )  # [T, N, H]
        return jnp.einsum("TNH,NHD->TD", out, self.o[...].astype(x.dtype)) + self.o_bias[...].astype(x.dtype)


class BertLayer(nnx.Module):
    def __init__(self, config: BertConfig, *, dtype, rngs: nnx.Rngs):
        d, f, eps = config.hidden_size, config.intermediate_size, config.norm_eps
        self.attention = BertSelfAttention(config, dtype=dtype, rngs=rngs)
        self.attention_norm = LayerNorm(d, eps=eps, dtype=dtype, rngs=rngs)
        self.intermediate = Linear(d, f, axes=("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.output = Linear(f, d, axes=("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
        self.output_norm = LayerNorm(d, eps=eps, dtype=dtype, rngs=rngs)
        self.act = activation(config.hidden_act)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        h = self.attention_norm(x + self.attention(x, positions, segment_ids))
        return self.output_norm(h + self.output(self.act(self.intermediate(h))))


class BertModel(nnx.Module):
    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        d = config.hidden_size
        self.word_embeddings = Embed(config.vocab_size, d, dtype=dtype, rngs=rngs)
        self.position_embeddings = Embed(
            config.max_position_embeddings, d, dtype=dtype, rngs=rngs, axes=(None, "embed")
        )
        self.token_type_embeddings = Embed(config.type_vocab_size, d, dtype=dtype, rngs=rngs, axes=(None, "embed"))
        self.embeddings_norm = LayerNorm(d, eps=config.norm_eps, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([BertLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])

    def __call__(
        self,
        input_ids: jax.Array,  # [T] int32
        positions: jax.Array,  # [T] int32
        segment_ids: jax.Array,  # [T] int32, -1 for padding
        token_type_ids: jax.Array | None = None,  # [T] int32, 0 when absent
    ) -> jax.Array:
        """The last layer's hidden states ``[T, D]`` (in the model's dtype)."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        x = self.embeddings_norm(x.astype(self.dtype))  # [T, D]
        for layer in self.layers:
            x = layer(x, positions, segment_ids)
        return x


def hf_weight_map(config: BertConfig) -> list[WeightSpec]:
    """Hugging Face tensor names -> NNX parameter paths (``nn.Linear`` weights are ``[out, in]``)."""
    d, n, h = config.hidden_size, config.num_heads, config.head_dim
    specs = [
        WeightSpec("embeddings.word_embeddings.weight", ("word_embeddings", "embedding")),
        WeightSpec("embeddings.position_embeddings.weight", ("position_embeddings", "embedding")),
        WeightSpec("embeddings.token_type_embeddings.weight", ("token_type_embeddings", "embedding")),
        WeightSpec("embeddings.LayerNorm.weight", ("embeddings_norm", "scale")),
        WeightSpec("embeddings.LayerNorm.bias", ("embeddings_norm", "bias")),
    ]
    for i in range(config.num_layers):
        hf, nn_ = f"encoder.layer.{i}.", ("layers", i)
        for hf_name, name in (("query", "q"), ("key", "k"), ("value", "v")):
            specs += [
                WeightSpec(f"{hf}attention.self.{hf_name}.weight", (*nn_, "attention", name), transpose=True,
                           reshape=(d, n, h)),
                WeightSpec(f"{hf}attention.self.{hf_name}.bias", (*nn_, "attention", f"{name}_bias"), reshape=(n, h)),
            ]
        specs += [
            WeightSpec(hf + "attention.output.dense.weight", (*nn_, "attention", "o"), transpose=True,
                       reshape=(n, h, d)),
            WeightSpec(hf + "attention.output.dense.bias", (*nn_, "attention", "o_bias")),
            WeightSpec(hf + "attention.output.LayerNorm.weight", (*nn_, "attention_norm", "scale")),
            WeightSpec(hf + "attention.output.LayerNorm.bias", (*nn_, "attention_norm", "bias")),
            WeightSpec(hf + "intermediate.dense.weight", (*nn_, "intermediate", "kernel"), transpose=True),
            WeightSpec(hf + "intermediate.dense.bias", (*nn_, "intermediate", "bias")),
            WeightSpec(hf + "output.dense.weight", (*nn_, "output", "kernel"), transpose=True),
            WeightSpec(hf + "output.dense.bias", (*nn_, "output", "bias")),
            WeightSpec(hf + "output.LayerNorm.weight", (*nn_, "output_norm", "scale")),
            WeightSpec(hf + "output.LayerNorm.bias", (*nn_, "output_norm", "bias")),
        ]
    return [_with_aliases(s) for s in specs]


def _with_aliases(spec: WeightSpec) -> WeightSpec:
    # Checkpoints saved from a task model prefix everything with "bert."; old exports name
    # LayerNorm parameters gamma/beta.
    names = [spec.hf_name]
    if spec.hf_name.endswith("LayerNorm.weight"):
        names.append(spec.hf_name.removesuffix("weight") + "gamma")
    elif spec.hf_name.endswith("LayerNorm.bias"):
        names.append(spec.hf_name.removesuffix("bias") + "beta")
    aliases = tuple(names[1:]) + tuple("bert." + n for n in names)
    return dataclasses.replace(spec, aliases=aliases)
