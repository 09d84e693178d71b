"""``energon generate`` and ``energon info``: output checked against transformers."""

from __future__ import annotations

import pytest

from energon_jax.cli import main
from energon_jax.commands.info import describe
from energon_jax.tokenizer import Tokenizer


def test_generate_streams_the_greedy_completion(tiny_checkpoint, capsys):
    import torch
    from hf_fixtures import load_hf_model

    path = tiny_checkpoint("llama")
    prompt = "The quick brown fox"
    rc = main(["generate", "--model", str(path), prompt, "--max-tokens", "12", "--temperature", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    tok = Tokenizer.from_pretrained(path)
    ids = tok.encode(prompt)
    hf = load_hf_model(path, "llama")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert out == prompt + tok.decode(ref.tolist()) + "\n"


def test_generate_rejects_bad_arguments(tiny_checkpoint, capsys):
    rc = main(["generate", "--model", str(tiny_checkpoint("llama")), "hi", "--top-p", "0"])
    assert rc == 2
    assert "top_p=0.0" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["llama_gqa", "gpt2"])
def test_info_matches_transformers(tiny_checkpoint, variant, capsys):
    from hf_fixtures import load_hf_model

    path = tiny_checkpoint(variant)
    hf = load_hf_model(path, variant)
    facts = describe(str(path), "float32", max_model_len=64, max_num_seqs=2)
    assert facts["parameters"] == hf.num_parameters()
    assert facts["weights_bytes"] == 4 * hf.num_parameters()
    cfg = hf.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert facts["kv_bytes_per_token"] == 2 * cfg.num_hidden_layers * kv_heads * head_dim * 4
    assert facts["kv_bytes_full"] == facts["kv_bytes_per_token"] * 64 * 2
    # CPU: the explicit default pool, 2 sequences of 64 tokens in pages of 16 (+ the null page).
    assert facts["kv_pool"].startswith("8 pages x 16 tokens = 128 tokens; 2 sequences of max_model_len=64 at once")
    # An accelerator's statistics: what is left of 90% of its memory after the weights, in pages.
    limit = 10 * facts["weights_bytes"]
    sized = describe(str(path), "float32", max_model_len=64, page_size=16, device_stats={"bytes_limit": limit})
    pages = int((0.9 * limit - facts["weights_bytes"]) // (facts["kv_bytes_per_token"] * 16))
    assert sized["kv_pool"].startswith(f"{pages - 1} pages x 16 tokens = {(pages - 1) * 16} tokens; "
                                       f"{(pages - 1) // 4} sequences of max_model_len=64")
    assert main(["info", "--model", str(path)]) == 0
    printed = capsys.readouterr().out
    assert facts["architecture"] in printed and f"{hf.num_parameters():,}" in printed
    assert "KV pool" in printed
