"""Kernel benchmarks: each op against its XLA baseline on the current backend, as one table.

    python benchmarks/kernels.py                 # every case, sizes for the backend found
    python benchmarks/kernels.py --small         # small sizes (what CPU runs by default)
    python benchmarks/kernels.py --tiny          # seconds on a CPU (benchmarks/device_check.sh --tiny)
    python benchmarks/kernels.py --only flash    # cases whose name contains "flash"

One command for a one-shot GPU run: it runs every case and prints a Markdown table in the
``benchmarks/RESULTS.md`` format (paste it under the machine line it prints first). Each
row is one timed implementation: median time, TFLOP/s and/or GB/s, the fraction of the
device's peak (when the device is in ``PEAKS``), the ratio against its baseline measured
in the same run, and issue 4's target next to it with whether it was met. A case or a
baseline that fails (out of memory, a compile error) prints an ``error`` row with the
message and the run goes on; the exit status is 1 if any row failed.

A one-shot GPU session (everything that needs the device, in order of value):

    python -m pytest -q tests/test_kernel_lowering.py tests/test_flash_attention.py \
        tests/test_paged_attention.py tests/test_int8_matmul.py tests/test_sparse_matmul.py
    python benchmarks/kernels.py | tee kernels_gpu.md

The kernel tests run compiled there (``kernel_cases.INTERPRET`` is False off CPU) and the
lowering tests compile the Triton IR to PTX with the CUDA plugin (jaxlib > 0.10.2).

``implementation="auto"`` picks the Pallas kernel on GPU/TPU and the jnp reference (XLA for
paged attention) on CPU, where interpret mode is far too slow to time; the ``impl`` column
says which ran, and targets are judged only for rows where the Pallas kernel ran.

Targets (issue 4): FlashAttention bf16, T 4k-16k, H 128: >= 0.8x cuDNN and >= 3x plain jnp;
paged decode and ragged paged attention (issue 17: decode rows and a prefill chunk in one
step): >= 60 % of HBM bandwidth on the K/V bytes read; batch-1 decode of a 1B-class random
Llama (``decode_roofline.py``): >= 75 % of the HBM roofline; sparse matmul at 80 %
sparsity, N (= M here, activation rows) 8-32, 7168x28672: >= 1.3x dense bf16; int8 matmul
at batch 1: >= 1.5x bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

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
    ragged_paged_attention,
    ragged_paged_attention_reference,
    resolve_implementation,
    sparse_matmul,
)
from pallas_kernels.int8_matmul import quantize_weight_int8
from pallas_kernels.page_layout import quantize_kv

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


@dataclasses.dataclass(frozen=True)
class Target:
    """``kind``: "ratio" (time ratio against ``baseline``) or "hbm" (fraction of HBM bandwidth)."""

    kind: str
    value: float
    baseline: str = ""

    def describe(self) -> str:
        return f">= {self.value:g}x {self.baseline}" if self.kind == "ratio" else f">= {self.value:.0%} of HBM"


@dataclasses.dataclass
class Row:
    case: str
    impl: str
    seconds: float | None = None
    flops: float = 0.0
    nbytes: float = 0.0
    baseline: str = ""  # name of the row this one is compared with
    target: Target | None = None
    error: str = ""


def timeit(fn: Callable, *args, reps: int) -> float:
    """Median seconds of ``fn(*args)`` (compiled once, warmed up, synchronised each run)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(row: Row, fn: Callable, *args, reps: int) -> Row:
    """Time ``fn`` into ``row``; a failure becomes the row's error, not the run's."""
    try:
        row.seconds = timeit(fn, *args, reps=reps)
    except Exception as e:  # noqa: BLE001 - one failing case must not stop a one-shot GPU run
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return row


# --- cases: each yields its rows, baselines first ------------------------------------------


def randn(key: int, shape, dtype) -> jax.Array:
    """Standard normal numbers made on the device (host numpy would take seconds at these sizes)."""
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def flash_rows(t: int, n: int, k: int, h: int, dtype, reps: int) -> Iterator[Row]:
    q = randn(0, (t, n, h), dtype)
    kv = [randn(i, (t, k, h), dtype) for i in (1, 2)]
    seg, pos = jnp.zeros(t, jnp.int32), jnp.arange(t, dtype=jnp.int32)
    flops = 4 * t * t * n * h / 2  # causal: half of QK^T and PV
    case = f"flash prefill T={t} N={n} K={k} H={h} {jnp.dtype(dtype).name}"
    plain = jax.jit(lambda q, k, v: flash_attention_reference(q, k, v, segment_ids=seg, positions=pos, causal=True))
    yield measure(Row(case, "plain jnp", flops=flops), plain, q, *kv, reps=reps)
    if jax.default_backend() == "gpu":
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q[None], k[None], v[None], is_causal=True, implementation="cudnn")[0])
        yield measure(Row(case, "cudnn", flops=flops), cudnn, q, *kv, reps=reps)
    impl = resolve_implementation("auto")
    ours = jax.jit(lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, positions=pos, causal=True))
    row = measure(Row(case, impl, flops=flops, baseline="plain jnp", target=Target("ratio", 3.0, "plain jnp")),
                  ours, q, *kv, reps=reps)
    yield row
    if jax.default_backend() == "gpu":  # the same timing judged against cuDNN
        yield dataclasses.replace(row, baseline="cudnn", target=Target("ratio", 0.8, "cudnn"))


def paged_rows(b: int, ctx: int, n: int, k: int, h: int, page: int, dtype, reps: int) -> Iterator[Row]:
    rng = np.random.default_rng(0)
    per_row = -(-ctx // page)
    shape = (1 + b * per_row, page, k, h)
    kp, vp = (randn(i, shape, jnp.float32) for i in (3, 4))
    scales = {}
    if dtype == jnp.int8:
        (kp, ks), (vp, vs) = (quantize_kv(x.reshape(-1, k, h)) for x in (kp, vp))
        kp, vp = kp.reshape(shape), vp.reshape(shape)
        scales = dict(k_scale=ks.reshape(shape[:3]), v_scale=vs.reshape(shape[:3]))
    else:
        kp, vp = kp.astype(dtype), vp.astype(dtype)
    tables = jnp.asarray(1 + rng.permutation(b * per_row).reshape(b, per_row), jnp.int32)
    lengths = jnp.full((b,), ctx, jnp.int32)
    q = randn(5, (b, n, h), jnp.bfloat16 if dtype == jnp.int8 else dtype)
    # Bytes the kernel must read: every row's K and V (and their scales for int8 pages).
    nbytes = 2 * b * ctx * k * (h * jnp.dtype(dtype).itemsize + (4 if scales else 0))
    case = f"paged decode B={b} ctx={ctx} N={n} K={k} H={h} S={page} {jnp.dtype(dtype).name} pages"
    ref = jax.jit(lambda q, kp, vp, sc: paged_attention_reference(q, kp, vp, tables, lengths, **sc))
    yield measure(Row(case, "jnp reference", nbytes=nbytes), ref, q, kp, vp, scales, reps=reps)
    impl = resolve_implementation("auto", has_xla=True)
    ours = jax.jit(lambda q, kp, vp, sc: paged_attention(q, kp, vp, tables, lengths, **sc))
    yield measure(Row(case, impl, nbytes=nbytes, baseline="jnp reference", target=Target("hbm", 0.6)),
                  ours, q, kp, vp, scales, reps=reps)


def ragged_rows(decode: int, ctx: int, chunk: int, n: int, k: int, h: int, page: int, dtype, reps: int
                ) -> Iterator[Row]:
    """One mixed serving step: ``decode`` decode rows at context ``ctx`` and one ``chunk``-token
    prefill chunk resuming at ``ctx``: the ragged kernel against the per-token paged path."""
    rng = np.random.default_rng(1)
    b = decode + (1 if chunk else 0)
    lens = np.array([ctx] * decode + ([ctx + chunk] if chunk else []), np.int32)
    per_row = -(-int(lens.max()) // page)
    shape = (1 + b * per_row, page, k, h)
    kp, vp = (randn(i, shape, jnp.float32).astype(dtype) for i in (6, 7))
    tables = jnp.asarray(1 + rng.permutation(b * per_row).reshape(b, per_row), jnp.int32)
    q_lens = [1] * decode + ([chunk] if chunk else [])
    t = sum(q_lens)
    q = randn(8, (t, n, h), dtype)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    seg = jnp.asarray(np.repeat(np.arange(b), q_lens), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(L - ql, L) for L, ql in zip(lens, q_lens)]), jnp.int32)
    lengths, num_rows = jnp.asarray(lens), jnp.asarray([b], jnp.int32)
    nbytes = 2 * int(lens.sum()) * k * h * jnp.dtype(dtype).itemsize  # every row's K and V, read once
    flops = 4 * n * h * (decode * ctx + chunk * ctx + chunk * chunk / 2)
    case = f"ragged step {decode} decode@{ctx} + chunk {chunk} N={n} K={k} H={h} S={page} {jnp.dtype(dtype).name}"
    ref = jax.jit(lambda q, kp, vp: ragged_paged_attention_reference(q, kp, vp, tables, lengths, cu, num_rows))
    yield measure(Row(case, "jnp reference", flops=flops, nbytes=nbytes), ref, q, kp, vp, reps=reps)
    per_token = jax.jit(lambda q, kp, vp: paged_attention(q, kp, vp, tables, lengths, segment_ids=seg, positions=pos))
    paged_impl = resolve_implementation("auto", has_xla=True)
    label = "per-token pallas" if paged_impl == "pallas" else paged_impl
    yield measure(Row(case, label, flops=flops, nbytes=nbytes), per_token, q, kp, vp, reps=reps)
    ours = jax.jit(lambda q, kp, vp: ragged_paged_attention(q, kp, vp, tables, lengths, cu, num_rows))
    yield measure(Row(case, resolve_implementation("auto"), flops=flops, nbytes=nbytes, baseline=label,
                      target=Target("hbm", 0.6)), ours, q, kp, vp, reps=reps)


def matmul_rows(m_values, k: int, n: int, sparsity: float, reps: int) -> Iterator[Row]:
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.bfloat16)
    wq, scales = quantize_weight_int8(w)
    wp = np.asarray(w, np.float32)
    wp[rng.random(wp.shape) < sparsity] = 0.0
    packed = pack_sparse(jnp.asarray(wp, jnp.bfloat16))
    del wp
    print(f"sparse weight {k}x{n} at {sparsity:.0%}: packed {packed.packed_bytes / 2**20:.1f} MiB vs dense "
          f"{packed.dense_bytes / 2**20:.1f} MiB ({packed.packed_bytes / packed.dense_bytes:.1%})", flush=True)
    impl = resolve_implementation("auto")
    dense = jax.jit(lambda x, w: jnp.dot(x, w))
    i8 = jax.jit(lambda x, wq, s: int8_matmul(x, wq, s))
    sp = jax.jit(lambda x, p: sparse_matmul(x, p))
    for m in m_values:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        flops = 2 * m * k * n
        yield measure(Row(f"int8 matmul M={m} K={k} N={n}", "dense bf16", flops=flops, nbytes=2 * k * n),
                      dense, x, w, reps=reps)
        yield measure(Row(f"int8 matmul M={m} K={k} N={n}", impl, flops=flops, nbytes=k * n + 4 * n,
                          baseline="dense bf16", target=Target("ratio", 1.5, "dense bf16") if m == 1 else None),
                      i8, x, wq, scales, reps=reps)
        case = f"sparse matmul {sparsity:.0%} M={m} K={k} N={n}"
        yield measure(Row(case, "dense bf16", flops=flops, nbytes=2 * k * n), dense, x, w, reps=reps)
        target = Target("ratio", 1.3, "dense bf16") if 8 <= m <= 32 and sparsity >= 0.8 else None
        yield measure(Row(case, impl, flops=flops, nbytes=packed.packed_bytes, baseline="dense bf16", target=target),
                      sp, x, packed, reps=reps)


def cases(small: bool, reps: int, tiny: bool = False) -> list[tuple[str, Callable[[], Iterator[Row]]]]:
    """(name, thunk) per case; a thunk builds its inputs only when run, so one that fails to
    even build (out of memory) fails alone."""
    from decode_roofline import decode_rows

    if tiny:  # every case once, at sizes a CPU runs in seconds: the script cannot rot
        return [
            ("flash T=64", lambda: flash_rows(64, 4, 2, 64, jnp.float32, reps)),
            ("paged ctx=64 f32", lambda: paged_rows(2, 64, 4, 2, 64, 16, jnp.float32, reps)),
            ("ragged step f32", lambda: ragged_rows(2, 64, 16, 4, 2, 64, 16, jnp.float32, reps)),
            ("matmul 256x512", lambda: matmul_rows((1,), 256, 512, 0.8, reps)),
            ("decode tiny", lambda: decode_rows(tiny=True, reps=reps)),
        ]
    if small:
        return [
            ("flash T=512", lambda: flash_rows(512, 8, 2, 128, jnp.float32, reps)),
            ("paged ctx=512 f32", lambda: paged_rows(8, 512, 8, 2, 128, 16, jnp.float32, reps)),
            ("paged ctx=512 int8", lambda: paged_rows(8, 512, 8, 2, 128, 16, jnp.int8, reps)),
            ("ragged step 8 decode + 128 chunk", lambda: ragged_rows(8, 512, 128, 8, 2, 128, 16, jnp.float32, reps)),
            ("matmul 512x2048", lambda: matmul_rows((1, 8), 512, 2048, 0.8, reps)),
        ]
    out: list[tuple[str, Callable[[], Iterator[Row]]]] = []
    for t in (4096, 8192, 16384):
        out.append((f"flash T={t}", lambda t=t: flash_rows(t, 32, 8, 128, jnp.bfloat16, reps)))
    for ctx in (1024, 4096, 16384):
        out.append((f"paged ctx={ctx} bf16", lambda ctx=ctx: paged_rows(32, ctx, 32, 8, 128, 16, jnp.bfloat16, reps)))
    out.append(("paged ctx=4096 int8", lambda: paged_rows(32, 4096, 32, 8, 128, 16, jnp.int8, reps)))
    for decode, ctx, chunk in ((32, 4096, 0), (31, 4096, 512), (1, 16384, 0), (8, 2048, 2048)):
        out.append((f"ragged step {decode} decode + {chunk} chunk ctx={ctx}",
                    lambda d=decode, c=ctx, ch=chunk: ragged_rows(d, c, ch, 32, 8, 128, 16, jnp.bfloat16, reps)))
    out.append(("decode 1B batch 1", lambda: decode_rows(tiny=False, reps=reps)))
    out.append(("matmul 7168x28672", lambda: matmul_rows((1, 8, 16, 32), 7168, 28672, 0.8, reps)))
    return out


# --- the table -----------------------------------------------------------------------------

HEADER = "| case | impl | ms | TFLOP/s | GB/s | % of peak | vs baseline | target | met |"


def format_row(row: Row, baseline: Row | None) -> str:
    if row.error or row.seconds is None:
        return f"| {row.case} | {row.impl} | error | | | | | {row.target.describe() if row.target else ''} | " \
               f"{row.error.replace('|', '/')} |"
    p = peak()
    tf = row.flops / row.seconds / 1e12 if row.flops else None
    gb = row.nbytes / row.seconds / 1e9 if row.nbytes else None
    # Fraction of peak: of HBM bandwidth where the row is memory-bound (its FLOPs per byte
    # are below the device's ridge point, or it is judged on bandwidth), else of bf16 FLOP/s.
    frac = None
    if p and gb is not None and (tf is None or row.flops / row.nbytes < p[0] * 1e3 / p[1]
                                 or (row.target is not None and row.target.kind == "hbm")):
        frac = f"{gb / p[1]:.1%} HBM"
    elif p and tf is not None:
        frac = f"{tf / p[0]:.1%} FLOP"
    ratio = None
    if baseline is not None and baseline.seconds is not None and not baseline.error:
        ratio = baseline.seconds / row.seconds
    ratio_s = f"{ratio:.2f}x vs {row.baseline}" if ratio is not None else (
        f"baseline {row.baseline} failed" if row.baseline else "")
    met = ""
    if row.target is not None:
        if row.impl != "pallas":
            met = f"n/a ({row.impl} ran)"
        elif row.target.kind == "ratio":
            met = "?" if ratio is None else ("yes" if ratio >= row.target.value else "no")
        else:
            met = "? (no peak)" if not p or gb is None else ("yes" if gb / p[1] >= row.target.value else "no")
    cells = [row.case, row.impl, f"{row.seconds * 1e3:.3f}", f"{tf:.2f}" if tf is not None else "",
             f"{gb:.1f}" if gb is not None else "", frac or "", ratio_s,
             row.target.describe() if row.target else "", met]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes (default on CPU)")
    parser.add_argument("--tiny", action="store_true", help="every case once at tiny sizes (seconds on a CPU)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--reps", type=int, default=10, help="timed runs per row (median reported)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps={args.reps} must be >= 1")
    small = args.small or jax.default_backend() == "cpu"
    dev = jax.devices()[0]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {now}, jax {jax.__version__}, backend={jax.default_backend()} device={dev.device_kind} "
          f"({platform.machine()}, {platform.python_version()}), peak (bf16 TFLOP/s, HBM GB/s)={peak()}, "
          f"sizes={'tiny' if args.tiny else 'small' if small else 'full'}", flush=True)
    selected = [(name, thunk) for name, thunk in cases(small, args.reps, args.tiny) if args.only in name]
    if not selected:
        parser.error(f"--only={args.only!r} matches no case")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1), flush=True)
    failed = 0
    for name, thunk in selected:
        done: dict[tuple[str, str], Row] = {}  # (case, impl) -> its row, for the baselines
        try:
            for row in thunk():
                print(format_row(row, done.get((row.case, row.baseline))), flush=True)
                failed += bool(row.error)
                done[(row.case, row.impl)] = row
        except Exception as e:  # noqa: BLE001 - building a case's inputs failed: report it and go on
            failed += 1
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".replace("|", "/")
            print(f"| {name} | (setup) | error | | | | | | {msg} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
