"""Shared helpers for the kernel tests: pairwise case grids, packed batches, error metric."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# The same tests run compiled on an accelerator and in interpret mode on CPU. Interpret
# mode starts outputs as NaN (the "fully written" check); compiled runs do not poison.
INTERPRET = jax.default_backend() == "cpu"
# Smallest row tile: 8 keeps interpret mode cheap; tl.dot on a GPU needs 16.
MIN_ROWS = 8 if INTERPRET else 16


def pairwise(factors: dict[str, tuple]) -> list[dict]:
    """A small set of cases in which every pair of factor values appears at least once (greedy)."""
    names = list(factors)
    full = [dict(zip(names, combo)) for combo in itertools.product(*factors.values())]

    def pairs(case):
        return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(c) for c in full))
    chosen = []
    while uncovered:
        best = max(full, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def case_id(case: dict) -> str:
    return "-".join(f"{k}={getattr(v, '__name__', v)}" for k, v in case.items())


def packed_batch(rng: np.random.Generator, total: int, num_segments: int, padding: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions of ``num_segments`` random-length sequences plus trailing padding (-1)."""
    real = total - padding
    cuts = np.sort(rng.choice(np.arange(1, real), size=num_segments - 1, replace=False)) if num_segments > 1 else []
    bounds = [0, *cuts, real]
    seg = np.full(total, -1, np.int32)
    pos = np.zeros(total, np.int32)
    for s, (a, b) in enumerate(itertools.pairwise(bounds)):
        seg[a:b] = s
        pos[a:b] = np.arange(b - a)
    return seg, pos


def rel_err(out: jax.Array, ref: jax.Array) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def randn(rng: np.random.Generator, shape, dtype) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def two_prompts(rng: np.random.Generator, lengths=(9, 6), vocab: int = 300) -> list[list[int]]:
    return [list(rng.integers(3, vocab, n)) for n in lengths]


def greedy_no_cache(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy decoding by re-running the whole packed prefix each step (flash_attention path)."""
    seqs = [list(p) for p in prompts]
    bucket = sum(map(len, prompts)) + steps * len(prompts)  # one shape for every step: compile once
    for _ in range(steps):
        pad = bucket - sum(map(len, seqs))
        ids = np.concatenate([np.asarray(s) for s in seqs] + [np.zeros(pad)]).astype(np.int32)
        seg = np.concatenate([np.full(len(s), r) for r, s in enumerate(seqs)] + [np.full(pad, -1)]).astype(np.int32)
        pos = np.concatenate([np.arange(len(s)) for s in seqs] + [np.zeros(pad)]).astype(np.int32)
        last = np.cumsum([len(s) for s in seqs]) - 1
        logits, _ = model(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg), logits_indices=jnp.asarray(last))
        for r, tok in enumerate(np.asarray(jnp.argmax(logits, axis=-1))):
            seqs[r].append(int(tok))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


# Run by test_kernel_lowering's IR dump in a Python that has OpenAI Triton (not a project
# dependency): compiles each dumped kernel with Triton's own pipeline and ptxas, no GPU needed.
TRITON_COMPILE_SCRIPT = '''"""Compile the Triton IR files beside this script for sm_90 and sm_80; prints one line each."""
import glob, json, os, sys
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget, Language
from triton.backends.nvidia.compiler import CUDABackend

failed = 0
for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.ttir"))):
    launch = json.load(open(path[:-5] + ".json"))
    for cc in (90, 80):
        backend = CUDABackend(GPUTarget("cuda", cc, 32))
        opts = backend.parse_options(launch)
        ctx = ir.context()
        ir.load_dialects(ctx)
        backend.load_dialects(ctx)
        src = ir.parse_mlir_module(path, ctx)
        src.context = ctx
        stages, metadata = {}, {}
        backend.add_stages(stages, opts, Language.TRITON)
        try:
            for name, stage in stages.items():
                src = stage(src, metadata)
                if name == "ttgir":  # software pipelining shows as async global->shared copies
                    copies = str(src).count("async_copy_global_to_local")
            print(f"OK   sm_{cc} {os.path.basename(path)}: cubin {len(src)} bytes, shared {metadata.get('shared')} "
                  f"bytes, {copies} pipelined (async) loads")
        except Exception as e:  # report every kernel, then fail
            failed += 1
            print(f"FAIL sm_{cc} {os.path.basename(path)}: {type(e).__name__}: {str(e).splitlines()[0]}")
sys.exit(1 if failed else 0)
'''
