"""energon_jax.tokenizer against transformers' AutoTokenizer on tokenizers built here.

Two tokenizer styles are trained on a small mixed corpus (ASCII code, CJK, emojis):
a GPT-2-style byte-level BPE, and a Llama-2-style sentencepiece BPE with byte fallback
and a post-processor that prepends bos. Both are saved with transformers'
``save_pretrained`` and read back by both libraries.
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from energon_jax.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Foo:\n    def __init__(self, x):\n        self.x = x  # 初始化\n",
    "print('héllo wörld') 🙂 🚀 naïve café",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji soup: 🎉🎉 👍🏽 🧑‍💻 ❤️ 🇫🇷",
    "import os\nimport sys\nfor i in range(10):\n    print(i ** 2)\n",
] * 20

SAMPLES = [
    "def fibonacci(n):",
    "hello world",
    "  leading spaces and trailing  ",
    "日本語のテキスト 🙂🚀",
    "mixed: café 👍🏽 中文 <|endoftext|> after special",
    "<s>bos in text</s>",
    "🧑‍💻 new emoji never seen: 🦜🦩 and rare CJK 龘",
    "",
    "\n\n\t tabs\tand\nnewlines\n",
]


def _byte_level_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    out = tmp_path_factory.mktemp("bytelevel")
    fast.save_pretrained(out)
    eos = tok.token_to_id("<|endoftext|>")
    (out / "config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": eos}))
    return str(out)


def _llama_style_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # Byte-fallback tokens are ordinary vocabulary entries (not special), as in Llama 2:
    # append them to the trained vocabulary.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = HFTokenizer.from_str(json.dumps(spec))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    out = tmp_path_factory.mktemp("llamastyle")
    fast.save_pretrained(out)
    eos = tok.token_to_id("</s>")
    # Llama-3-instruct style: the model stops on more than one id.
    (out / "config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, bos + 100]}))
    return str(out)


@pytest.fixture(scope="module", params=["byte_level", "llama_style"])
def tokenizer_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "byte_level":
        return _byte_level_dir(tmp_path_factory)
    return _llama_style_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def pair(tokenizer_dir: str) -> tuple[Tokenizer, object]:
    return Tokenizer.from_pretrained(tokenizer_dir), transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens: bool) -> None:
    ours, ref = pair
    for text in SAMPLES:
        expected = ref(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
    batch = ours.encode_batch(SAMPLES, add_special_tokens=add_special_tokens)
    assert batch == [ref(t, add_special_tokens=add_special_tokens)["input_ids"] for t in SAMPLES]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(pair, skip_special_tokens: bool) -> None:
    ours, ref = pair
    for text in SAMPLES:
        ids = ref(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens) == ref.decode(ids, skip_special_tokens=skip_special_tokens)
    rng = random.Random(0)
    for _ in range(50):  # arbitrary id sequences, including split UTF-8 bytes
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 20))]
        assert ours.decode(ids, skip_special_tokens) == ref.decode(ids, skip_special_tokens=skip_special_tokens)


def test_special_token_ids(pair, tokenizer_dir: str) -> None:
    ours, ref = pair
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    assert ref.eos_token_id in ours.eos_token_ids
    assert set(ref.all_special_ids) <= ours.all_special_ids
    gen_path = f"{tokenizer_dir}/generation_config.json"
    try:
        with open(gen_path) as f:
            gen_eos = set(json.load(f)["eos_token_id"])
    except FileNotFoundError:
        gen_eos = set()
    assert ours.eos_token_ids == {ref.eos_token_id} | gen_eos
    # A leading bos exactly when transformers adds one.
    ids = ours.encode("hello")
    assert (ids[0] == ours.bos_token_id) == (ref("hello")["input_ids"][0] == ref.bos_token_id)


def test_incremental_detokenizer_streams_complete_characters(pair) -> None:
    ours, ref = pair
    split_seen = False
    for text in SAMPLES + CORPUS[:6]:
        ids = ours.encode(text)
        detok = IncrementalDetokenizer(ours)
        deltas = [detok.add(i) for i in ids]
        deltas.append(detok.flush())
        assert "".join(deltas) == ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        for d in deltas:
            assert "\ufffd" not in d, (text, deltas)
        # Some emoji/CJK character must have been split over several tokens, so the
        # hold-back path is exercised (the vocabulary is too small to hold them whole).
        split_seen |= any(d == "" for d in deltas[:-1]) and any(ord(c) > 0x7FF for c in text)
    assert split_seen


def test_incremental_detokenizer_random_ids(pair) -> None:
    ours, _ = pair
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            detok = ours.detokenizer(skip_special_tokens=skip)
            out = "".join(detok.add(i) for i in ids) + detok.flush()
            assert out == ours.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_add_many_and_prompt(pair) -> None:
    ours, _ = pair
    prompt = ours.encode("def f(x): 🙂")
    completion = ours.encode("  return x 🚀 中文", add_special_tokens=False)
    detok = ours.detokenizer()
    head = detok.add_many(prompt)
    rest = "".join(detok.add(i) for i in completion) + detok.flush()
    assert head + rest == ours.decode(prompt + completion)
    assert detok.token_ids == prompt + completion


def test_missing_tokenizer_json_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_encode_rejects_non_string(pair) -> None:
    ours, _ = pair
    with pytest.raises(ValueError, match="text must be a str"):
        ours.encode(123)  # type: ignore[arg-type]
