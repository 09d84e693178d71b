"""Embeddings of released-style sentence-transformers checkpoints against sentence-transformers.

The checkpoints are tiny random BERTs laid out as sentence-transformers releases are
(``hf_fixtures.sentence_transformers_layout``: weights without a ``bert.`` prefix,
``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``, and a lower-casing
WordPiece ``tokenizer.json`` that pads every text to 128 tokens and truncates at 16).
sentence-transformers itself, loading the same folder, is the reference: for mean, CLS and
last-token pooling, with and without a Normalize module, ``Engine.embed`` with its defaults
must give the same vectors (cosine distance <= 1e-5); max and mean/sqrt(length) pooling
too. Also: stored padding/truncation never
reach the engine, an over-long text is an error naming the limit (or cut where asked), and
the encoder's runner (``EmbeddingRunner``) buckets like the decoder and compiles nothing
after warm-up.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from energon_jax import Engine
from energon_jax.batch import Buckets
from energon_jax.embedding import EmbeddingRunner
from energon_jax.tokenizer import Tokenizer
from hf_fixtures import sentence_transformers_layout
from models.pooling import PoolingConfig
from models.sentence_config import SentenceConfig, read_sentence_config

# Lengths 25, 3, 6, 10 with the template: one longer than the stored truncation (16), all
# far shorter than the stored padding (128), 44 tokens in all (one 64-token bucket).
TEXTS = [
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a tiny model that loved attention.",
    "hello",
    "HELLO, World!",
    "Paged attention keeps the key value cache.",
]
MODES = ("mean", "cls", "lasttoken")
ENGINE_KWARGS = dict(max_num_batched_tokens=64, max_num_seqs=4, warmup=False)


# The other pooling modes sentence-transformers and the engine share, without Normalize.
OTHER_MODES = ("max", "mean_sqrt_len")
PIPELINES = [(mode, norm) for mode in MODES for norm in (False, True)] + [(mode, False) for mode in OTHER_MODES]


@pytest.fixture(scope="module")
def st_dirs(tiny_checkpoint, tmp_path_factory):
    """``(mode, normalize) -> checkpoint folder`` for every pipeline tested."""
    root = tmp_path_factory.mktemp("st")
    bert = tiny_checkpoint("bert")
    return {(mode, norm): sentence_transformers_layout(bert, root / f"{mode}_{norm}", mode, normalize=norm)
            for mode, norm in PIPELINES}


@pytest.fixture(scope="module")
def engines(st_dirs):
    return {key: Engine.from_pretrained(path, **ENGINE_KWARGS) for key, path in st_dirs.items()}


def _reference(path, texts, max_seq_length=None) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model.encode(list(texts), convert_to_numpy=True, batch_size=len(texts))


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1.0 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_stored_padding_and_truncation_never_apply(st_dirs):
    from transformers import PreTrainedTokenizerFast

    path = st_dirs[("mean", True)]
    stored = json.loads((path / "tokenizer.json").read_text())
    assert stored["padding"]["strategy"] == {"Fixed": 128} and stored["truncation"]["max_length"] == 16
    ours = Tokenizer.from_pretrained(path)
    hf = PreTrainedTokenizerFast.from_pretrained(str(path))
    want = [hf(t, padding=False, truncation=False)["input_ids"] for t in TEXTS]
    assert [len(w) for w in want] == [25, 3, 6, 10]
    assert ours.encode_batch(TEXTS) == want
    assert [ours.encode(t) for t in TEXTS] == want
    # Truncation only where asked, keeping [CLS] ... [SEP] as transformers' truncation=True does.
    assert ours.encode_batch(TEXTS, max_length=10) == [
        hf(t, truncation=True, max_length=10)["input_ids"] for t in TEXTS
    ]
    with pytest.raises(ValueError, match="max_length=0 must be an int >= 1"):
        ours.encode_batch(TEXTS, max_length=0)


@pytest.mark.parametrize("mode,normalize", PIPELINES)
def test_embeddings_match_sentence_transformers(st_dirs, engines, mode, normalize):
    engine = engines[(mode, normalize)]
    assert engine.embedder.sentence.pooling == PoolingConfig(mode=mode, normalize=normalize)
    got = engine.embed(TEXTS)  # defaults: the checkpoint's pooling and normalisation
    want = _reference(st_dirs[(mode, normalize)], TEXTS)
    assert got.shape == want.shape == (len(TEXTS), 64) and got.dtype == np.float32
    assert np.max(_cosine_distance(got, want)) <= 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    norms = np.linalg.norm(got, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == normalize  # unit vectors exactly when Normalize is there
    # An explicit normalize= overrides the checkpoint's default either way.
    unit = engine.embed(TEXTS, normalize=True)
    np.testing.assert_allclose(unit, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)


def test_over_long_text_is_an_error_unless_truncation_is_asked_for(st_dirs):
    path = st_dirs[("mean", True)]
    engine = Engine.from_pretrained(path, max_model_len=12, **ENGINE_KWARGS)
    with pytest.raises(ValueError, match=r"texts\[0\] has 25 tokens; the limit is min\(max_model_len=12"):
        engine.embed(TEXTS)
    got = engine.embed(TEXTS, truncate=True)
    want = _reference(path, TEXTS, max_seq_length=12)  # sentence-transformers truncates silently
    assert np.max(_cosine_distance(got, want)) <= 1e-5
    with pytest.raises(ValueError, match="max_model_len=129 exceeds the encoder's max_position_embeddings=128"):
        Engine.from_pretrained(path, max_model_len=129, **ENGINE_KWARGS)


def test_max_seq_length_of_the_checkpoint_is_the_default_limit(st_dirs, tmp_path):
    import shutil

    path = shutil.copytree(st_dirs[("cls", False)], tmp_path / "short")
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 20, "do_lower_case": True}))
    config = read_sentence_config(path)
    assert config == SentenceConfig(PoolingConfig("cls", False), max_seq_length=20, do_lower_case=True)
    engine = Engine.from_pretrained(path, **ENGINE_KWARGS)
    assert engine.config.max_model_len == 20
    with pytest.raises(ValueError, match="has 25 tokens; the limit is min"):
        engine.embed(TEXTS[:1])


def test_sentence_transformers_6_format_is_read(tiny_checkpoint, tmp_path):
    # sentence-transformers 6.x saves "pooling_mode" and module types under new paths.
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    bert = Transformer(str(tiny_checkpoint("bert")))
    model = SentenceTransformer(modules=[bert, Pooling(64, pooling_mode="lasttoken"), Normalize()], device="cpu")
    model.save(str(tmp_path / "st6"))
    config = read_sentence_config(tmp_path / "st6")
    assert config.pooling == PoolingConfig("lasttoken", normalize=True)


def test_unsupported_modules_are_an_error(st_dirs, tmp_path):
    import shutil

    path = shutil.copytree(st_dirs[("mean", False)], tmp_path / "dense")
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"modules \['Transformer', 'Pooling', 'Dense'\] are not supported"):
        read_sentence_config(path)


def test_embedding_runner_buckets_like_the_decoder_and_compiles_nothing_after_warmup(engines):
    engine = engines[("mean", True)]
    runner = engine.embedder
    assert isinstance(runner, EmbeddingRunner)
    assert engine.scheduler is None and engine.runner is None  # no scheduler, no KV pool
    with pytest.raises(ValueError, match="is an encoder: use embed"):
        engine.generate(["hello"], use_tqdm=False)
    want = Buckets.create(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=128, page_size=1)
    assert runner.buckets.all_shapes() == want.all_shapes() == [(16, 4), (32, 4), (64, 4)]
    whole = engine.embed(TEXTS)
    compiles = engine.warmup()
    assert compiles == engine.num_compiles == len(want.all_shapes())
    # Any split of the texts into calls and batches gives the same vectors, with no compile.
    one_by_one = np.concatenate([engine.embed(t) for t in TEXTS])
    many = engine.embed(TEXTS * 3)  # 132 tokens: three batches of at most 4 texts / 64 tokens
    assert engine.num_compiles == compiles
    np.testing.assert_allclose(one_by_one, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(many, np.concatenate([whole] * 3), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="texts must not be empty"):
        engine.embed([])
