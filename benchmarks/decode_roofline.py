"""Batch-1 decode of a random Llama against the HBM roofline (a case of ``kernels.py``).

One decode step is the model's jitted forward for one token over a paged KV cache (the
serving path's attention: ``step_attention``, the ragged kernel on GPU/TPU) plus the
greedy argmax, the cache donated. A step must read every weight once and the row's K/V,
so its time is bounded below by ``(weight bytes + K/V bytes) / HBM bandwidth``: the
``GB/s`` column is those bytes over the measured step time, and the target is 75 % of the
device's HBM peak. Host scheduling is not included (``benchmarks/offline.py`` measures the
engine end to end).

1B-class: Llama-3.2-1B's shape (16 layers, hidden 2048, 32 query / 8 KV heads of 64, MLP
8192, vocab 128256, ~1.24 B parameters, bfloat16), random weights, context 1024.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llama import LlamaConfig, LlamaForCausalLM
from pallas_kernels import PagedAttentionMetadata, make_kv_pages, resolve_implementation

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                intermediate_size=8192)
TINY = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
            intermediate_size=128)


def decode_rows(*, tiny: bool, reps: int, context: int = 1024, page_size: int = 16) -> Iterator:
    from kernels import Row, Target  # the table's types (this module is one of its cases)

    shape = TINY if tiny else LLAMA_1B
    context = 64 if tiny else context
    dtype = jnp.float32 if tiny else jnp.bfloat16
    config = LlamaConfig(architecture="LlamaForCausalLM", max_position_embeddings=context + 16, **shape)
    model = LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    # Every weight is read once per step, except the embedding table: one row of it.
    embedding = model.embed_tokens.embedding[...]
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state)) - embedding.nbytes + embedding[0].nbytes
    pages = -(-(context + 1) // page_size)
    cache = tuple(make_kv_pages(1 + pages, page_size, config.num_kv_heads, config.head_dim, dtype)
                  for _ in range(config.num_layers))
    kv_bytes = 2 * config.num_layers * (context + 1) * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize
    table = jnp.arange(1, 1 + pages, dtype=jnp.int32)[None, :]
    pos = jnp.asarray([context], jnp.int32)
    meta = PagedAttentionMetadata(slot_mapping=table[0, context // page_size][None] * page_size + context % page_size,
                                  page_tables=table, context_lens=pos + 1)

    @jax.jit
    def step(state, cache, ids):
        logits, cache = nnx.merge(graphdef, state)(ids, pos, jnp.zeros(1, jnp.int32), kv_cache=cache,
                                                   attn_meta=meta, logits_indices=jnp.zeros(1, jnp.int32))
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    case = (f"decode batch 1, random Llama {sum(x.size for x in jax.tree.leaves(state)) / 1e9:.2f} B params "
            f"{jnp.dtype(dtype).name}, ctx {context}")
    row = Row(case, resolve_implementation("auto", has_xla=True), nbytes=weight_bytes + kv_bytes,
              target=Target("hbm", 0.75))

    def run(state, cache):  # one compile, then steps chained as the engine chains them
        ids = jnp.asarray(np.ones(1, np.int32))
        ids, cache = step(state, cache, ids)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            ids, cache = step(state, cache, ids)
            ids.block_until_ready()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    try:
        row.seconds = run(state, cache)
    except Exception as e:  # noqa: BLE001 - reported as the row's error, like every other case
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    yield row


def main(argv=None) -> int:
    """Run this case alone (``kernels.py`` runs it among the others, in one table)."""
    import argparse
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Batch-1 decode of a random 1B-class Llama against the HBM "
                                                 "roofline (one case of benchmarks/kernels.py, run alone)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and context (a CPU smoke run)")
    parser.add_argument("--reps", type=int, default=20, help="timed decode steps (median reported)")
    parser.add_argument("--context", type=int, default=1024, help="tokens already in the row's cache")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))  # kernels.py, for the row type and its formatting
    from kernels import format_row

    for row in decode_rows(tiny=args.tiny, reps=args.reps, context=args.context):
        print(format_row(row, None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
