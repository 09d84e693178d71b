"""The shipped demo checkpoint (energon_jax/demo): a correct, small, trained HF Llama.

It must load with transformers, agree with its own config and tokenizer, stay under
20 MB, produce printable text, know some Python (its loss on stdlib source is far below
that of a uniform guess), and give the same logits through ``models.load`` as through
transformers.
"""

from __future__ import annotations

import inspect
import json
import math
import string
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import energon_jax
from energon_jax.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DEMO_DIR = Path(energon_jax.__file__).parent / "demo"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
MAX_BYTES = 20_000_000
RTOL = 1e-4  # max |error| relative to max |reference|, float32 (issue 2)


@pytest.fixture(scope="module")
def hf_model():
    model = transformers.LlamaForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(DEMO_DIR)


def test_files_present_and_small() -> None:
    for name in FILES:
        assert (DEMO_DIR / name).is_file(), name
    total = sum((DEMO_DIR / name).stat().st_size for name in FILES)
    assert total <= MAX_BYTES, f"demo checkpoint is {total:,} bytes > {MAX_BYTES:,}"


def test_config_and_tokenizer_agree(tokenizer: Tokenizer) -> None:
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == tokenizer.vocab_size
    ref = transformers.AutoTokenizer.from_pretrained(DEMO_DIR)
    assert len(ref) == tokenizer.vocab_size
    assert config["eos_token_id"] in tokenizer.eos_token_ids
    assert tokenizer.eos_token_ids == {ref.eos_token_id}
    assert config["bos_token_id"] == tokenizer.bos_token_id == ref.bos_token_id
    with safe_open(str(DEMO_DIR / "model.safetensors"), "np") as f:
        embed = f.get_slice("model.embed_tokens.weight").get_shape()
    assert embed == [config["vocab_size"], config["hidden_size"]]
    # A prompt starts like every training file: after the bos/eos separator.
    text = "def fibonacci(n):\n    return n  # 🙂"
    ids = tokenizer.encode(text)
    assert ids == ref(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text


def test_greedy_generation_is_printable_text(hf_model, tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("def ")
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    new = out[0, len(prompt) :].tolist()
    assert len(new) > 0
    text = tokenizer.decode(new)
    assert text.strip(), f"empty completion: {new}"
    assert all(c in string.printable or c.isprintable() for c in text), repr(text)
    assert "\ufffd" not in text
    detok = tokenizer.detokenizer()
    assert "".join(detok.add(t) for t in new) + detok.flush() == text


def test_model_knows_python(hf_model, tokenizer: Tokenizer) -> None:
    """Mean next-token loss on real Python source is far below a uniform guess (ln V)."""
    source = inspect.getsource(textwrap)
    ids = tokenizer.encode(source)[:256]
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert loss < 0.5 * math.log(tokenizer.vocab_size), f"{loss=:.3f}: the demo model looks untrained"


def test_models_load_matches_transformers(hf_model, tokenizer: Tokenizer) -> None:
    import jax.numpy as jnp

    import models

    model, config = models.load(DEMO_DIR, dtype="float32")
    rng = np.random.default_rng()
    code = np.asarray(tokenizer.encode("class Stack:\n    def push(self, item):\n        self.items.append(item)\n"))
    seqs = [code, rng.integers(0, tokenizer.vocab_size, int(rng.integers(5, 40)))]
    input_ids = np.concatenate(seqs).astype(np.int32)
    positions = np.concatenate([np.arange(len(s)) for s in seqs]).astype(np.int32)
    segment_ids = np.concatenate([np.full(len(s), i) for i, s in enumerate(seqs)]).astype(np.int32)
    logits, _ = model(jnp.asarray(input_ids), jnp.asarray(positions), jnp.asarray(segment_ids))
    logits = np.asarray(logits, np.float64)
    assert logits.shape == (len(input_ids), config.vocab_size)
    assert np.isfinite(logits).all()
    start = 0
    for s in seqs:
        with torch.no_grad():
            ref = hf_model(torch.tensor(s[None].astype(np.int64))).logits[0].double().numpy()
        err = np.max(np.abs(logits[start : start + len(s)] - ref)) / np.max(np.abs(ref))
        assert err <= RTOL, f"max relative error {err:.3g} > {RTOL}"
        start += len(s)
