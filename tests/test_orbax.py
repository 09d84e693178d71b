"""``energon convert`` and orbax restore: identical logits, dtype casts, sharded restore.

The sharded restore runs in a child process (this file run as a script) with 4 simulated
CPU devices, because ``--xla_force_host_platform_device_count`` only takes effect before
jax starts and the rest of the suite runs with one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def _params(model) -> dict:
    from flax import nnx

    return {".".join(map(str, p)): v.get_value() for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


def _logits(model, n: int = 13):
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    ids = (jnp.arange(n, dtype=jnp.int32) * 7) % model.config.vocab_size
    forward = nnx.jit(lambda m, ids, pos, seg: m(ids, pos, seg)[0])
    return np.asarray(forward(model, ids, jnp.arange(n, dtype=jnp.int32), jnp.zeros(n, jnp.int32)))


def _shard_rule(mesh, size: int):
    """Shard the first axis named heads/mlp/vocab/expert that ``size`` divides; replicate the rest."""
    from jax.sharding import NamedSharding, PartitionSpec

    def place(path, axes, shape):
        spec = [None] * len(shape)
        for i, (axis, dim) in enumerate(zip(axes, shape)):
            if axis in ("heads", "mlp", "vocab", "expert") and dim % size == 0:
                spec[i] = "tp"
                break
        return NamedSharding(mesh, PartitionSpec(*spec))

    return place


def child_sharded_restore(workdir: str, checkpoints: dict[str, str]) -> dict:
    """Convert, then restore with shardings over 4 devices; report what each array holds."""
    import jax
    import numpy as np

    import models
    from energon_jax.commands.convert import convert

    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("tp",))
    place = _shard_rule(mesh, len(devices))
    report = {"devices": len(devices)}
    for variant, hf in checkpoints.items():
        out = convert(hf, Path(workdir) / f"orbax_{variant}")
        reference, _ = models.load(hf)
        sharded, _ = models.load(out, param_sharding=place)
        from_hf, _ = models.load(hf, param_sharding=place)
        want, got, got_hf = _logits(reference), _logits(sharded), _logits(from_hf)
        split = {}
        for name, value in _params(sharded).items():
            shard_shapes = sorted({tuple(s.data.shape) for s in value.addressable_shards})
            split[name] = [list(value.shape), [list(s) for s in shard_shapes], str(value.sharding.spec)]
        report[variant] = {
            "shards": split,
            # Same placement, same program: bit-identical; against one device only rounding differs.
            "orbax_equal": bool(np.array_equal(got_hf, got)),
            "rel_err_vs_one_device": float(np.max(np.abs(want - got)) / np.max(np.abs(want))),
            "same_placement": all(
                a.sharding == b.sharding for a, b in zip(_params(sharded).values(), _params(from_hf).values())
            ),
        }
    return report


# ------------------------------------------------------------------------------ tests


def test_convert_cli_round_trip_is_identical(tiny_checkpoint, tmp_path):
    import numpy as np

    import models
    from energon_jax.cli import main

    for variant in ("llama_tied", "mixtral", "qwen2"):
        hf = tiny_checkpoint(variant)
        out = tmp_path / variant
        assert main(["convert", str(hf), str(out)]) == 0
        names = {p.name for p in out.iterdir()}
        assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
        assert not list(out.glob("*.safetensors"))
        restored, config = models.load(out)
        original, _ = models.load(hf)
        assert config == models.load_config(hf)
        a, b = _params(original), _params(restored)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), (variant, name)
        np.testing.assert_array_equal(_logits(restored), _logits(original))


def test_restore_casts_dtype(tiny_checkpoint, tmp_path):
    import jax.numpy as jnp
    import numpy as np

    import models
    from energon_jax.commands.convert import convert

    hf = tiny_checkpoint("llama_gqa")
    f32_dir = convert(hf, tmp_path / "f32")
    bf16_dir = convert(hf, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf16_dir / "energon_checkpoint.json").read_text())["dtype"] == "bfloat16"
    want = _params(models.load(hf, "bfloat16")[0])
    for model in (models.load(f32_dir, "bfloat16")[0], models.load(bf16_dir, "bfloat16")[0]):
        got = _params(model)
        for name in want:
            assert got[name].dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(got[name], np.float32), np.asarray(want[name], np.float32))
    up = _params(models.load(bf16_dir, "float32")[0])
    for name in want:
        assert up[name].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(up[name]), np.asarray(want[name], np.float32))


def test_convert_refuses_non_empty_out_dir(tiny_checkpoint, tmp_path, capsys):
    from energon_jax.cli import main

    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["convert", str(tiny_checkpoint("llama")), str(out)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err


def test_orbax_shape_mismatch_is_an_error(tiny_checkpoint, tmp_path):
    import pytest

    import models
    from energon_jax.commands.convert import convert

    out = convert(tiny_checkpoint("llama"), tmp_path / "o")
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (out / "config.json").write_text(json.dumps(cfg))
    pattern = (
        r"shape mismatch for parameter layers\.0\.mlp\.down_proj\.kernel: "
        r"orbax checkpoint has \(128, 64\), model expects \(96, 64\)"
    )
    with pytest.raises(ValueError, match=pattern):
        models.load(out)


def test_sharded_restore_places_shards(tiny_checkpoint, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    checkpoints = {v: str(tiny_checkpoint(v)) for v in ("llama", "mixtral")}
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path), json.dumps(checkpoints)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert report["devices"] == 4
    for variant in ("llama", "mixtral"):
        r = report[variant]
        assert r["orbax_equal"], variant
        assert r["rel_err_vs_one_device"] <= 1e-5, variant
        assert r["same_placement"], variant
        shards = r["shards"]
        # Column-parallel q: [64, 64] split 4 ways on heads; every device holds a quarter.
        q = shards["layers.0.self_attn.q_proj.kernel"]
        assert q[0] == [64, 64] and q[1] == [[64, 16]]
        head = shards["lm_head.kernel"]
        assert head[0] == [64, 300] and head[1] == [[64, 75]]
        norm = shards["norm.scale"]
        assert norm[1] == [[64]]  # replicated
    experts = report["mixtral"]["shards"]["layers.1.mlp.w_gate"]
    assert experts[0] == [4, 64, 128] and experts[1] == [[1, 64, 128]]


if __name__ == "__main__":
    print(json.dumps(child_sharded_restore(sys.argv[1], json.loads(sys.argv[2]))))
