"""models.load on safetensors: shards, dtypes, placement, and the errors a user can cause."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import load_hf_model
from model_checks import hf_logits, rel_err
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file

import models
from models import loading


def _params(model) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)
    }


def _logits(model, n=11):
    ids = jnp.arange(3, 3 + n, dtype=jnp.int32)
    return np.asarray(model(ids, jnp.arange(n, dtype=jnp.int32), jnp.zeros(n, jnp.int32))[0])


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_supported_architectures():
    archs = models.supported_architectures()
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM",
                 "GPT2LMHeadModel", "OPTForCausalLM", "BertModel"):
        assert name in archs


def test_sharded_index_loads_same_weights(tiny_checkpoint):
    sharded = tiny_checkpoint("llama", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    one, _ = models.load(tiny_checkpoint("llama"))
    many, config = models.load(sharded)
    a, b = _params(one), _params(many)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert config.num_layers == 2


def test_missing_tensor_is_an_error(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint("llama"), tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\).*'model\.layers\.1\.mlp\.up_proj\.weight'"):
        models.load(path)


def test_wrong_shape_names_tensor_and_both_shapes(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint("llama_gqa"), tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"

    def edit(t):
        assert t[name].shape == (48, 64)
        t[name] = np.zeros((40, 64), np.float32)

    _rewrite(path, edit)
    with pytest.raises(
        ValueError,
        match=r"shape mismatch for tensor 'model\.layers\.0\.self_attn\.k_proj\.weight': "
        r"checkpoint has \(40, 64\), model expects \(48, 64\)",
    ):
        models.load(path)


def test_unexpected_tensor_warns_and_loads(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2")
    path = _copy(src, tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.0.extra.weight": np.ones((3,), np.float32)}))
    with pytest.warns(UserWarning, match=r"1 unexpected tensor\(s\).*'model\.layers\.0\.extra\.weight'"):
        model, _ = models.load(path)
    np.testing.assert_array_equal(_logits(model), _logits(models.load(src)[0]))


def test_unknown_architecture_lists_supported(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint("llama"), tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    pattern = r"unsupported architectures=\['FooForCausalLM'\].*supported: .*LlamaForCausalLM.*MixtralForCausalLM"
    with pytest.raises(ValueError, match=pattern):
        models.load(path)
    with pytest.raises(ValueError, match=pattern):
        models.load_config(path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickle_checkpoint_refused_with_conversion_hint(tiny_checkpoint, tmp_path, name):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(tiny_checkpoint("llama") / "config.json", path / "config.json")
    torch.save({"model.embed_tokens.weight": torch.zeros(3, 3)}, path / name)
    hint = r"refusing to load pickle.*safe_serialization=True"
    with pytest.raises(ValueError, match=hint):
        models.load(path)
    with pytest.raises(ValueError, match=hint):
        models.load(path / name)


def test_unsupported_dtype():
    with pytest.raises(ValueError, match=r"dtype='int8' is not supported; supported: float32, bfloat16, float16"):
        models.parse_dtype("int8")


def test_bfloat16_safetensors_read_exactly(tiny_checkpoint, tmp_path):
    """A bf16 checkpoint (numpy cannot read bf16 safetensors) loads bit-exactly, upcast to float32."""
    path = _copy(tiny_checkpoint("llama_tied"), tmp_path)
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in load_file(path / "model.safetensors").items()}
    save_torch_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model, _ = models.load(path, "float32")
    got = _params(model)
    want = got["embed_tokens.embedding"]
    np.testing.assert_array_equal(want, tensors["model.embed_tokens.weight"].float().numpy())
    np.testing.assert_array_equal(
        got["layers.1.self_attn.q_proj.kernel"], tensors["model.layers.1.self_attn.q_proj.weight"].float().numpy().T
    )


def test_float16_load_close_to_reference(tiny_checkpoint):
    path = tiny_checkpoint("mistral")
    model, config = models.load(path, "float16")
    assert model.lm_head.kernel.get_value().dtype == jnp.float16
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 15).astype(np.int32)
    got = model(jnp.asarray(ids), jnp.arange(15, dtype=jnp.int32), jnp.zeros(15, jnp.int32))[0]
    # float16 keeps 11 mantissa bits (relative step 2^-11); measured error is ~1.5e-3.
    assert rel_err(got, hf_logits(load_hf_model(path, "mistral"), ids)) <= 5e-3


def test_param_sharding_called_for_every_param(tiny_checkpoint):
    calls = {}
    device = jax.devices()[0]

    def place(path, axes, shape):
        calls[".".join(path)] = (axes, shape)
        return jax.sharding.SingleDeviceSharding(device)

    model, _ = models.load(tiny_checkpoint("qwen2"), param_sharding=place)
    params = _params(model)
    assert calls.keys() == params.keys()
    assert calls["layers.0.self_attn.q_proj.kernel"] == (("embed", "heads"), (64, 64))
    assert calls["layers.1.self_attn.v_proj.bias"] == (("kv_heads",), (32,))
    assert calls["layers.1.mlp.gate_proj.kernel"] == (("embed", "mlp"), (64, 128))
    for p, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param):
            assert v.get_value().sharding == jax.sharding.SingleDeviceSharding(device)


def test_progress_bar_for_large_checkpoints(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(loading, "PROGRESS_MIN_BYTES", 0)
    models.load(tiny_checkpoint("llama"))
    assert "loading weights" in capsys.readouterr().err


def test_abstract_model_allocates_nothing(tiny_checkpoint):
    model = models.abstract_model(tiny_checkpoint("mixtral"), "bfloat16")
    for p, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param):
            assert isinstance(v.get_value(), jax.ShapeDtypeStruct), p
            assert v.get_value().dtype == jnp.bfloat16


_MAKE_BIG = """
import sys, transformers as tf
cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                     num_key_value_heads=4, intermediate_size=2816, max_position_embeddings=256)
tf.LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
"""

_LOAD_AND_MEASURE = """
import json, sys
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

before = status("VmRSS")
from models.loading import load
model, _ = load(sys.argv[1], "float32")
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.mark.slow
def test_peak_host_memory_about_one_model(tmp_path):
    """Loading a ~600 MiB float32 checkpoint raises peak RSS by about one model, not two."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    subprocess.run([sys.executable, "-c", _MAKE_BIG, str(tmp_path)], env=env, check=True, capture_output=True)
    model_bytes = (tmp_path / "model.safetensors").stat().st_size
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_MEASURE, str(tmp_path)], env=env, check=True, capture_output=True, text=True
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    growth = report["peak"] - report["before"]
    # One model, plus the reopen window of the reader and one transient copy of the largest tensor.
    assert growth <= model_bytes + loading.REOPEN_BYTES + 2 * 32000 * 1024 * 4, (growth, model_bytes)


@pytest.mark.parametrize("variant", ["llama", "llama_tied", "qwen2", "mixtral"])
def test_clean_checkpoints_load_without_warnings(tiny_checkpoint, variant):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        models.load(tiny_checkpoint(variant))
