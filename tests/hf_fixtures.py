"""Tiny random Hugging Face checkpoints, built with ``transformers`` and saved as safetensors.

``make_tiny_checkpoint(out_dir, variant)`` writes ``config.json``, ``model.safetensors``
(or shards plus ``model.safetensors.index.json`` when ``max_shard_size`` is given) and a
``tokenizer.json`` (with ``tokenizer_config.json``) into ``out_dir`` and returns it.

Every parameter is re-drawn at random after construction (norm scales near 1, biases
non-zero) so that a mis-mapped bias or norm weight changes the logits: Hugging Face's
own init leaves biases at 0 and norm scales at 1, which would hide such bugs.

Variants (``VARIANTS``): llama, llama_gqa, llama3_rope, llama_tied, mistral, qwen2
(q/k/v bias), mixtral, gpt2, opt, bert. The configs are tiny (hidden 64, 2 layers, vocab
300) so a test builds one in well under a second. Tests use the cached session fixture
in ``tests/conftest.py`` (``tiny_checkpoint(variant)``) rather than calling this directly.
"""

from __future__ import annotations

from pathlib import Path

VOCAB_SIZE = 300
HIDDEN = 64
LAYERS = 2
HEADS = 4
INTERMEDIATE = 128
MAX_POSITIONS = 128

# Decoders: byte-level BPE tokenizer with these specials at ids 0, 1, 2.
DECODER_SPECIALS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# BERT: WordPiece with the usual specials at ids 0..4.
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Once upon a time there was a tiny model that loved attention.",
    "Paged attention keeps the key value cache in fixed size pages.",
    "naïve café, déjà vu, Straße, 日本語のテキスト, emoji 🙂🚀",
    "Hello world! hello World? HELLO, world.",
]

VARIANTS = ("llama", "llama_gqa", "llama3_rope", "llama_tied", "mistral", "qwen2", "mixtral", "gpt2", "opt", "bert")

# Architectures each variant saves (config.json "architectures").
ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "llama_gqa": "LlamaForCausalLM",
    "llama3_rope": "LlamaForCausalLM",
    "llama_tied": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "opt": "OPTForCausalLM",
    "bert": "BertModel",
}


def _hf_config(variant: str):
    """The ``transformers`` config object for a variant."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    if variant == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=HEADS, rms_norm_eps=1e-5, rope_theta=10000.0)
    if variant == "llama_gqa":
        # 4 query heads over 2 KV heads, and an explicit head_dim different from hidden / heads.
        return tf.LlamaConfig(**common, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6, rope_theta=500.0)
    if variant == "llama3_rope":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        # A small theta and short original length put frequencies in all three llama3 bands.
        return tf.LlamaConfig(
            **common, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=100.0, rope_scaling=scaling
        )
    if variant == "llama_tied":
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0)
    if variant == "mistral":
        return tf.MistralConfig(
            **common, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1000.0, sliding_window=None
        )
    if variant == "qwen2":
        return tf.Qwen2Config(
            **common, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False
        )
    if variant == "mixtral":
        return tf.MixtralConfig(
            **common,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    if variant == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_positions=MAX_POSITIONS,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )
    if variant == "opt":
        # OPT's learned positions are offset by 2 and it has a project_in/out only when
        # word_embed_proj_dim != hidden_size: keep them equal like most OPT checkpoints.
        return tf.OPTConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            ffn_dim=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
            word_embed_proj_dim=HIDDEN,
            do_layer_norm_before=True,
            dropout=0.0,
            attention_dropout=0.0,
            activation_function="relu",
            pad_token_id=UNK_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )
    if variant == "bert":
        return tf.BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
            type_vocab_size=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )
    raise ValueError(f"unknown {variant=}; known: {VARIANTS}")


def _hf_model(variant: str, config):
    import transformers as tf

    if variant == "bert":
        return tf.BertModel(config, add_pooling_layer=False)
    return tf.AutoModelForCausalLM.from_config(config)


def _randomize(model, seed: int) -> None:
    """Re-draw every parameter: matrices N(0, 0.1^2), biases N(0, 0.05^2), norm scales 1 + N(0, 0.1^2)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            lname = name.lower()
            if p.ndim == 1 and ("norm" in lname or "ln" in lname) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.1 * noise)


def _decoder_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(DECODER_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _bert_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(BERT_SPECIALS), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def _save_tokenizer(variant: str, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    if variant == "bert":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_bert_tokenizer(),
            unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        )
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_decoder_tokenizer(), unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
    fast.save_pretrained(str(out_dir))


def make_tiny_checkpoint(
    out_dir: str | Path,
    variant: str,
    *,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    overrides: dict | None = None,
) -> Path:
    """Build a tiny random checkpoint of ``variant`` in ``out_dir``; returns ``out_dir`` as a Path.

    ``max_shard_size`` (e.g. ``"40KB"``) splits the weights into several safetensors
    shards with a ``model.safetensors.index.json``. ``overrides`` sets config attributes
    before the model is built (e.g. ``{"attention_bias": True}`` for a Llama variant).
    """
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"unknown {variant=}; known: {VARIANTS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = _hf_config(variant)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    model = _hf_model(variant, config).to(torch.float32).eval()
    _randomize(model, seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(out), **kwargs)
    _save_tokenizer(variant, out)
    return out


def load_hf_model(path: str | Path, variant: str):
    """The saved checkpoint loaded back with ``transformers`` in float32, eval mode (the reference)."""
    import torch
    import transformers as tf

    if variant == "bert":
        model = tf.BertModel.from_pretrained(str(path), dtype=torch.float32, add_pooling_layer=False)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


# sentence-transformers module types as released checkpoints (all-MiniLM-L6-v2 & co) name them.
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
ST_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def sentence_transformers_layout(
    bert_dir: str | Path,
    out_dir: str | Path,
    pooling: str,
    *,
    normalize: bool,
    pad_to: int = MAX_POSITIONS,
    truncate_at: int = 16,
    max_seq_length: int = MAX_POSITIONS,
) -> Path:
    """A copy of a tiny ``bert`` checkpoint laid out as sentence-transformers releases save one.

    ``modules.json`` (Transformer, Pooling, and Normalize when ``normalize``),
    ``1_Pooling/config.json`` with the boolean ``pooling_mode_*`` keys, and
    ``sentence_bert_config.json``. The weights stay as ``BertModel`` saves them, without a
    ``bert.`` prefix. As in those releases, ``tokenizer.json`` pads every text to a fixed
    ``pad_to`` tokens and truncates at ``truncate_at``: settings that must not change what
    an engine computes (sentence-transformers' own tokenizer call overrides both).
    """
    import json
    import shutil

    from tokenizers import Tokenizer

    src, out = Path(bert_dir), Path(out_dir)
    shutil.copytree(src, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.enable_padding(length=pad_to, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    tok.enable_truncation(max_length=truncate_at)
    tok.save(str(out / "tokenizer.json"))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_NORMALIZE})
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling").mkdir()
    config = {"word_embedding_dimension": HIDDEN, "pooling_mode_weightedmean_tokens": False, "include_prompt": True}
    config.update({key: mode == pooling for mode, key in ST_POOLING_KEYS.items()})
    (out / "1_Pooling" / "config.json").write_text(json.dumps(config, indent=2))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    return out
