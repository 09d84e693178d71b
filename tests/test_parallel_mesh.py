"""parallel/mesh.py: validation errors, the logical-axis table, and tensor parallelism on 8 CPU devices.

The multi-device checks run in a child process (this file run as a script) because
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only takes effect before jax
starts, and the rest of the suite runs with one device. The child compares a small
NNX transformer (built from ``models.layers``, with the same logical axes as the real
families) at ``tp`` 2, 4 and 8 against ``tp=1``: prefill and a paged decode step.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from energon_jax.parallel.options import ParallelOptions

# run_child lives in process_harness.py; the other test files import it from here too.
from process_harness import HERE, ROOT, run_child  # noqa: F401


# ----------------------------------------------------------------- in-process checks (1 device)


def test_parallel_config_rejects_bad_sizes():

    with pytest.raises(ValueError, match=r"tp=0 must be an integer >= 1"):
        ParallelOptions(tp=0)
    with pytest.raises(ValueError, match=r"pp=-1"):
        ParallelOptions(pp=-1)
    assert ParallelOptions(dp=2, pp=3, tp=4).num_devices == 24


def test_more_devices_than_exist_says_why():
    import jax

    from energon_jax.parallel.mesh import make_mesh

    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"{n + 1} devices asked, but only {n} exist"):
        make_mesh(ParallelOptions(tp=n + 1))


def test_tp_must_divide_heads():
    from energon_jax.parallel.mesh import validate_model_parallelism

    with pytest.raises(ValueError, match=r"tp=3 must divide num_heads=8"):
        validate_model_parallelism(ParallelOptions(tp=3), num_heads=8, num_kv_heads=8, num_layers=2)
    with pytest.raises(ValueError, match=r"tp=4 must divide intermediate_size=6"):
        validate_model_parallelism(
            ParallelOptions(tp=4), num_heads=8, num_kv_heads=4, num_layers=2, intermediate_size=6
        )
    with pytest.raises(ValueError, match=r"pp=3 must be <= num_layers=2"):
        validate_model_parallelism(ParallelOptions(pp=3), num_heads=8, num_kv_heads=8, num_layers=2)
    validate_model_parallelism(ParallelOptions(tp=8, pp=2), num_heads=8, num_kv_heads=2, num_layers=2)


def test_kv_heads_rule():
    from energon_jax.parallel.mesh import kv_heads_axis

    assert kv_heads_axis(1, 2) is None
    assert kv_heads_axis(2, 4) == "tp"  # 4 KV heads, 2 per shard
    assert kv_heads_axis(4, 4) == "tp"
    assert kv_heads_axis(8, 2) is None  # tp > K: replicated on every shard
    with pytest.raises(ValueError, match=r"tp=4 and num_kv_heads=6: one must divide the other"):
        kv_heads_axis(4, 6)


def test_partition_specs_column_row_vocab_expert():
    from jax.sharding import AbstractMesh, PartitionSpec as P

    from energon_jax.parallel.mesh import MESH_AXES, sharding_rules

    mesh = AbstractMesh((1, 1, 4), MESH_AXES)
    rules = sharding_rules(4, num_kv_heads=2)
    assert rules.partition_spec(("embed", "heads"), (16, 32), mesh) == P(None, "tp")  # column
    assert rules.partition_spec(("heads", "embed"), (32, 16), mesh) == P("tp", None)  # row
    assert rules.partition_spec(("mlp", "embed"), (64, 16), mesh) == P("tp", None)  # row (down)
    assert rules.partition_spec(("embed", "kv_heads"), (16, 8), mesh) == P(None, None)  # K=2 < tp
    assert rules.partition_spec(("vocab", "embed"), (128, 16), mesh) == P("tp", None)
    assert rules.partition_spec(("vocab", "embed"), (129, 16), mesh) == P(None, None)  # uneven vocab
    assert rules.partition_spec(("norm",), (16,), mesh) == P(None)
    # experts: mlp split inside each expert by default, whole experts with expert_parallel
    assert rules.partition_spec(("expert", "embed", "mlp"), (8, 16, 64), mesh) == P(None, None, "tp")
    ep = sharding_rules(4, num_kv_heads=2, expert_parallel=True)
    assert ep.partition_spec(("expert", "embed", "mlp"), (8, 16, 64), mesh) == P("tp", None, None)
    with pytest.raises(ValueError, match=r"w: logical axis 'mlp' has size 6, not divisible by tp=4"):
        rules.partition_spec(("embed", "mlp"), (16, 6), mesh, name="w")


# ----------------------------------------------------------------- 8 simulated devices


@pytest.mark.slow  # default-run budget (15 min quiet): tp parity is test_parallel_tp_models[llama] and test_parallel_engine's tp=8 layout
def test_tensor_parallel_matches_single_device():
    out = run_child(__file__, "tp")
    for case in out["cases"]:
        assert case["prefill_max_diff"] <= 1e-5, case
        assert case["decode_max_diff"] <= 1e-5, case
        assert case["same_greedy"], case
        assert case["q_spec"] == [None, "tp"], case  # column-parallel
        assert case["o_spec"] == ["tp", None], case  # row-parallel
        assert case["kv_page_shard_heads"] == case["expect_kv_shard_heads"], case
    assert sorted(c["tp"] for c in out["cases"]) == [2, 4, 8]


@pytest.mark.slow  # default-run budget (15 min quiet): test_cli_distributed's from_pretrained tp=2 load checks the same
def test_checkpoint_loads_straight_into_shards(tmp_path):
    """models.load(param_sharding=param_sharding_fn(...)) at tp=4 == load on one device."""
    out = run_child(__file__, "load", str(tmp_path))
    assert out["q_spec"] == [None, "tp"] and out["embed_spec"] == ["tp", None]
    assert out["q_local_shape"][1] * 4 == out["q_shape"][1]  # each device holds a quarter
    assert out["max_diff"] <= 1e-5 and out["same_greedy"]


# ----------------------------------------------------------------- the children


def _child_load(tmp: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import models
    from energon_jax.parallel.mesh import make_mesh, param_sharding_fn, replicated, sharding_rules
    from hf_fixtures import make_tiny_checkpoint

    path = make_tiny_checkpoint(os.path.join(tmp, "llama"), "llama")
    ref_model, config = models.load(path, "float32")
    mesh = make_mesh(ParallelOptions(tp=4))
    rules = sharding_rules(4, num_kv_heads=config.num_kv_heads)
    model, _ = models.load(path, "float32", param_sharding=param_sharding_fn(mesh, rules))
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(3, config.vocab_size, 12), jnp.int32)
    pos = jnp.arange(12, dtype=jnp.int32)
    seg = jnp.zeros(12, jnp.int32)

    def logits(m, put):
        graphdef, state = nnx.split(m)
        fn = jax.jit(lambda st, a, b, c: nnx.merge(graphdef, st)(a, b, c)[0])
        return np.asarray(fn(state, put(ids), put(pos), put(seg)))

    want = logits(ref_model, lambda a: a)
    got = logits(model, lambda a: jax.device_put(a, replicated(mesh)))
    q = model.layers[0].self_attn.q_proj.kernel.get_value()
    emb = model.embed_tokens.embedding.get_value()
    return {
        "q_spec": list(q.sharding.spec), "embed_spec": list(emb.sharding.spec),
        "q_shape": list(q.shape), "q_local_shape": list(q.addressable_shards[0].data.shape),
        "max_diff": float(np.max(np.abs(got - want))),
        "same_greedy": bool(np.array_equal(got.argmax(-1), want.argmax(-1))),
    }



def _tiny_model_cls():
    import jax.numpy as jnp
    from flax import nnx

    from models.layers import Embed, Linear, RMSNorm, apply_rope, attend, rope_inv_freq

    class Block(nnx.Module):
        def __init__(self, d, n, k, h, f, rngs):
            self.n, self.k, self.h = n, k, h
            self.norm1 = RMSNorm(d, eps=1e-6, dtype=jnp.float32, rngs=rngs)
            self.q = Linear(d, n * h, axes=("embed", "heads"), use_bias=False, dtype=jnp.float32, rngs=rngs)
            self.kp = Linear(d, k * h, axes=("embed", "kv_heads"), use_bias=True, dtype=jnp.float32, rngs=rngs)
            self.vp = Linear(d, k * h, axes=("embed", "kv_heads"), use_bias=True, dtype=jnp.float32, rngs=rngs)
            self.o = Linear(n * h, d, axes=("heads", "embed"), use_bias=False, dtype=jnp.float32, rngs=rngs)
            self.norm2 = RMSNorm(d, eps=1e-6, dtype=jnp.float32, rngs=rngs)
            self.up = Linear(d, f, axes=("embed", "mlp"), use_bias=False, dtype=jnp.float32, rngs=rngs)
            self.down = Linear(f, d, axes=("mlp", "embed"), use_bias=False, dtype=jnp.float32, rngs=rngs)
            self.inv_freq = rope_inv_freq(h, 10000.0, None)

        def __call__(self, x, positions, segment_ids, pages, meta):
            t = x.shape[0]
            hx = self.norm1(x)
            q = apply_rope(self.q(hx).reshape(t, self.n, self.h), positions, self.inv_freq)
            kk = apply_rope(self.kp(hx).reshape(t, self.k, self.h), positions, self.inv_freq)
            v = self.vp(hx).reshape(t, self.k, self.h)
            a, pages = attend(q, kk, v, segment_ids=segment_ids, positions=positions, kv_pages=pages, attn_meta=meta)
            x = x + self.o(a.reshape(t, self.n * self.h))
            return x + self.down(jnp.tanh(self.up(self.norm2(x)))), pages

    class TinyLM(nnx.Module):
        def __init__(self, v=96, d=32, n=8, k=2, h=8, f=64, layers=2, seed=0):
            rngs = nnx.Rngs(seed)
            self.embed = Embed(v, d, dtype=jnp.float32, rngs=rngs)
            self.blocks = nnx.List([Block(d, n, k, h, f, rngs) for _ in range(layers)])
            self.norm = RMSNorm(d, eps=1e-6, dtype=jnp.float32, rngs=rngs)
            self.head = Linear(d, v, axes=("embed", "vocab"), use_bias=False, dtype=jnp.float32, rngs=rngs)

        def __call__(self, ids, positions, segment_ids, kv_cache=None, attn_meta=None):
            x = self.embed(ids)
            new = []
            for i, blk in enumerate(self.blocks):
                x, p = blk(x, positions, segment_ids, None if kv_cache is None else kv_cache[i], attn_meta)
                new.append(p)
            return self.head(self.norm(x)), (None if kv_cache is None else tuple(new))

    return TinyLM


def _child_tp() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from energon_jax.parallel.mesh import (
        kv_pages_sharding, make_mesh, replicated, shard_model, sharding_rules,
    )
    from pallas_kernels import PagedAttentionMetadata, make_kv_pages

    assert len(jax.devices()) == 8, jax.devices()
    num_kv, page_size, num_pages = 2, 4, 12
    TinyLM = _tiny_model_cls()
    rng = np.random.default_rng(1234)
    lens = [5, 7]
    ids = np.concatenate([rng.integers(0, 96, n) for n in lens]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lens)]).astype(np.int32)
    # Pages: row 0 gets pages 1,2; row 1 gets 3,4 (page 0 is the null page).
    tables = np.array([[1, 2, 0], [3, 4, 0]], np.int32)
    slots = np.concatenate([tables[r, np.arange(n) // page_size] * page_size + np.arange(n) % page_size
                            for r, n in enumerate(lens)]).astype(np.int32)
    last = np.cumsum(lens) - 1

    def run(tp: int):
        model = TinyLM()
        mesh = make_mesh(ParallelOptions(tp=tp))
        rules = sharding_rules(tp, num_kv_heads=num_kv)
        shard_model(model, mesh, rules)
        ps = kv_pages_sharding(mesh, rules)
        cache = tuple(make_kv_pages(num_pages, page_size, num_kv, 8, jnp.float32, sharding=ps) for _ in range(2))
        graphdef, state = nnx.split(model)
        rep = replicated(mesh)

        @jax.jit
        def step(state, cache, ids, pos, seg, slots, tables, lens_):
            m = nnx.merge(graphdef, state)
            meta = PagedAttentionMetadata(slots, tables, lens_)
            return m(ids, pos, seg, kv_cache=cache, attn_meta=meta)

        put = lambda a: jax.device_put(jnp.asarray(a), rep)  # noqa: E731
        logits, cache = step(state, cache, put(ids), put(pos), put(seg), put(slots), put(tables),
                             put(np.array(lens, np.int32)))
        # One decode step: each row feeds its greedy token at the next position.
        nxt = np.asarray(jnp.argmax(logits[last], -1)).astype(np.int32)
        dpos = np.array(lens, np.int32)
        dslots = np.array([tables[r, p // page_size] * page_size + p % page_size for r, p in enumerate(dpos)],
                          np.int32)
        dlogits, cache = step(state, cache, put(nxt), put(dpos), put(np.arange(2, dtype=np.int32)),
                              put(dslots), put(tables), put(dpos + 1))
        q_spec = list(model.blocks[0].q.kernel.get_value().sharding.spec)
        o_spec = list(model.blocks[0].o.kernel.get_value().sharding.spec)
        kshard = cache[0].k.addressable_shards[0].data.shape[2]
        return np.asarray(logits), np.asarray(dlogits), nxt, q_spec, o_spec, kshard

    base_logits, base_dec, base_next, *_ = run(1)
    cases = []
    for tp in (2, 4, 8):
        logits, dec, nxt, q_spec, o_spec, kshard = run(tp)
        cases.append({
            "tp": tp,
            "prefill_max_diff": float(np.max(np.abs(logits - base_logits))),
            "decode_max_diff": float(np.max(np.abs(dec - base_dec))),
            "same_greedy": bool(np.array_equal(nxt, base_next))
            and bool(np.array_equal(np.argmax(dec, -1), np.argmax(base_dec, -1))),
            "q_spec": q_spec,
            "o_spec": o_spec,
            "kv_page_shard_heads": int(kshard),
            "expect_kv_shard_heads": num_kv // tp if num_kv % tp == 0 else num_kv,
        })
    return {"cases": cases}


if __name__ == "__main__":
    sys.path[:0] = [ROOT]
    sys.path[:0] = [HERE]
    result = _child_tp() if sys.argv[1] == "tp" else _child_load(sys.argv[2])
    print(json.dumps(result))
