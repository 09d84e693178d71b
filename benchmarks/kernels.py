"""Kernel benchmarks: each op against its XLA baseline on the current backend.

    python benchmarks/kernels.py            # sizes for the backend found (GPU: the issue's targets)
    python benchmarks/kernels.py --small    # small sizes (what CPU runs by default)

For every case it prints the median time, TFLOP/s or GB/s, the fraction of the device's
peak (when the device is in PEAKS), and the ratio against the baseline measured in the
same run. ``implementation="auto"`` picks the Pallas kernel on GPU/TPU and the jnp
reference on CPU (interpret mode is far too slow to time), so on CPU this proves the
script runs and times the reference paths; the line says which implementation ran.

Targets (issue 4), checked by reading the ratios on a GPU:
FlashAttention bf16, T 4k-16k, H 128: >= 0.8x cuDNN and >= 3x plain jnp; paged decode:
>= 60 % of HBM bandwidth on K/V bytes; sparse matmul at 80 % sparsity, N 8-32, 7168x28672:
>= 1.3x dense bf16; int8 matmul at batch 1: >= 1.5x bf16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import (
    flash_attention,
    flash_attention_reference,
    int8_matmul,
    pack_sparse,
    paged_attention,
    paged_attention_reference,
    resolve_implementation,
    sparse_matmul,
)
from pallas_kernels.int8_matmul import quantize_weight_int8

# device_kind substring -> (dense bf16 TFLOP/s, HBM GB/s), from the vendors' data sheets.
PEAKS = {
    "H100": (989.0, 3350.0),
    "H200": (989.0, 4800.0),
    "A100": (312.0, 2039.0),
    "TPU v5 lite": (197.0, 819.0),
    "TPU v5p": (459.0, 2765.0),
    "TPU v6": (918.0, 1640.0),
}


def peak() -> tuple[float, float] | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAKS.items() if k.lower() in kind.lower()), None)


def timeit(fn, *args, reps: int = 10) -> float:
    """Median seconds of ``fn(*args)`` (compiled once, warmed up, synchronised each run)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def report(name: str, seconds: float, *, flops: float = 0.0, nbytes: float = 0.0, baseline: float | None = None,
           baseline_name: str = "") -> None:
    p = peak()
    parts = [f"{name:<58s} {seconds * 1e3:9.3f} ms"]
    if flops:
        tf = flops / seconds / 1e12
        parts.append(f"{tf:8.2f} TFLOP/s" + (f" ({tf / p[0]:6.1%} of peak)" if p else ""))
    if nbytes:
        gb = nbytes / seconds / 1e9
        parts.append(f"{gb:8.1f} GB/s" + (f" ({gb / p[1]:6.1%} of HBM)" if p else ""))
    if baseline is not None:
        parts.append(f"{baseline / seconds:6.2f}x vs {baseline_name}")
    print("  ".join(parts), flush=True)


def bench_flash(t: int, n: int, k: int, h: int, dtype) -> None:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((t, n, h)), dtype)
    kv = [jnp.asarray(rng.standard_normal((t, k, h)), dtype) for _ in range(2)]
    seg = jnp.zeros(t, jnp.int32)
    pos = jnp.arange(t, dtype=jnp.int32)
    impl = resolve_implementation("auto")
    flops = 4 * t * t * n * h / 2  # causal: half of QK^T and PV
    ours = jax.jit(lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, positions=pos, causal=True))
    plain = jax.jit(lambda q, k, v: flash_attention_reference(q, k, v, segment_ids=seg, positions=pos, causal=True))
    t_plain = timeit(plain, q, *kv)
    t_ours = timeit(ours, q, *kv)
    tag = f"T={t} N={n} K={k} H={h} {jnp.dtype(dtype).name}"
    report(f"attention plain jnp            {tag}", t_plain, flops=flops)
    report(f"flash_attention[{impl}] {tag}", t_ours, flops=flops, baseline=t_plain, baseline_name="plain jnp")
    if jax.default_backend() == "gpu":
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q[None], k[None], v[None], is_causal=True, implementation="cudnn")[0])
        t_cudnn = timeit(cudnn, q, *kv)
        report(f"dot_product_attention[cudnn]   {tag}", t_cudnn, flops=flops)
        report(f"flash_attention[{impl}] vs cuDNN {tag}", t_ours, flops=flops, baseline=t_cudnn, baseline_name="cuDNN")


def bench_paged(b: int, ctx: int, n: int, k: int, h: int, page: int, dtype) -> None:
    rng = np.random.default_rng(0)
    per_row = -(-ctx // page)
    num_pages = 1 + b * per_row
    kp = jnp.asarray(rng.standard_normal((num_pages, page, k, h)), dtype)
    vp = jnp.asarray(rng.standard_normal((num_pages, page, k, h)), dtype)
    tables = jnp.asarray(1 + rng.permutation(b * per_row).reshape(b, per_row), jnp.int32)
    lengths = jnp.full((b,), ctx, jnp.int32)
    q = jnp.asarray(rng.standard_normal((b, n, h)), dtype)
    nbytes = 2 * b * ctx * k * h * jnp.dtype(dtype).itemsize
    impl = resolve_implementation("auto", has_xla=True)
    ours = jax.jit(lambda q, kp, vp: paged_attention(q, kp, vp, tables, lengths))
    ref = jax.jit(lambda q, kp, vp: paged_attention_reference(q, kp, vp, tables, lengths))
    t_ref = timeit(ref, q, kp, vp)
    t_ours = timeit(ours, q, kp, vp)
    tag = f"B={b} ctx={ctx} N={n} K={k} H={h} S={page} {jnp.dtype(dtype).name}"
    report(f"paged reference (jnp gather)   {tag}", t_ref, nbytes=nbytes)
    report(f"paged_attention[{impl}] {tag}", t_ours, nbytes=nbytes, baseline=t_ref, baseline_name="jnp reference")


def bench_matmuls(m_values, k: int, n: int, sparsity: float) -> None:
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.bfloat16)
    dense = jax.jit(lambda x, w: jnp.dot(x, w))
    wq, scales = quantize_weight_int8(w)
    wp = np.asarray(w, np.float32)
    wp[rng.random(wp.shape) < sparsity] = 0.0
    packed = pack_sparse(jnp.asarray(wp, jnp.bfloat16))
    impl = resolve_implementation("auto")
    print(f"sparse weight {k}x{n} at {sparsity:.0%}: packed {packed.packed_bytes / 2**20:.1f} MiB vs dense "
          f"{packed.dense_bytes / 2**20:.1f} MiB ({packed.packed_bytes / packed.dense_bytes:.1%})")
    i8 = jax.jit(lambda x, wq, s: int8_matmul(x, wq, s))
    sp = jax.jit(lambda x, p: sparse_matmul(x, p))
    for m in m_values:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        t_dense = timeit(dense, x, w)
        tag = f"M={m} K={k} N={n}"
        report(f"dense bf16 matmul              {tag}", t_dense, flops=2 * m * k * n, nbytes=2 * k * n)
        report(f"int8_matmul[{impl}]   {tag}", timeit(i8, x, wq, scales), flops=2 * m * k * n, nbytes=k * n,
               baseline=t_dense, baseline_name="dense bf16")
        report(f"sparse_matmul[{impl}] {tag}", timeit(sp, x, packed), flops=2 * m * k * n,
               nbytes=packed.packed_bytes, baseline=t_dense, baseline_name="dense bf16")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes (default on CPU)")
    args = parser.parse_args(argv)
    small = args.small or jax.default_backend() == "cpu"
    dev = jax.devices()[0]
    print(f"backend={jax.default_backend()} device={dev.device_kind} jax={jax.__version__} "
          f"peak={peak()} sizes={'small' if small else 'full'}", flush=True)
    if small:
        bench_flash(512, 8, 2, 128, jnp.float32)
        bench_paged(8, 512, 8, 2, 128, 16, jnp.float32)
        bench_matmuls((1, 8), 512, 2048, 0.8)
        return 0
    for t in (4096, 8192, 16384):
        bench_flash(t, 32, 8, 128, jnp.bfloat16)
    for ctx in (1024, 4096, 16384):
        bench_paged(32, ctx, 32, 8, 128, 16, jnp.bfloat16)
    bench_matmuls((1, 8, 16, 32), 7168, 28672, 0.8)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
