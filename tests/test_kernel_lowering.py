"""Every Pallas kernel lowers for the accelerator it is written for, on this CPU-only machine.

Interpret mode (the other kernel tests) checks what a kernel computes; it does not check
that Triton or Mosaic accept it. ``jax.export`` with ``platforms=["cuda"]`` or ``["tpu"]``
runs the real lowering without a device, at the shapes a model uses, with the kernel
forced (``implementation="pallas"``, ``interpret=False``):

- cuda (Triton): Pallas -> Triton IR, where an unsupported primitive, a tensor that is not
  power-of-two sized or a bad block spec fails. Without a GPU, jax lowers for compute
  capability 9.0 (``jax/_src/pallas/triton/pallas_call_registration.py``). jaxlib <= 0.10.2
  puts the Triton IR in a ``__gpu$xla.gpu.triton`` custom call that XLA compiles later;
  newer jaxlib compiles it to PTX while lowering, through the CUDA plugin's Triton handler,
  and emits ``triton_kernel_call_ffi``. Where that handler is missing (a newer jaxlib
  without the CUDA plugin) lowering stops right after the Triton IR is built: the test
  checks the captured IR and accepts only that error.
- tpu (Mosaic): Pallas -> Mosaic MLIR in a ``tpu_custom_call``. Mosaic's lowering asks
  for the chip's generation and tile sizes; ``jax.sharding.use_abstract_mesh`` with an
  ``AbstractDevice`` supplies them (TPU v5e here). Mosaic's own compilation to TPU code
  happens in libtpu and needs a TPU.

The TPU interpret-mode tests (FlashAttention, paged and ragged paged attention) run at
block sizes Mosaic accepts, and the tests here lower each kernel at exactly those sizes, so
interpret mode never passes a configuration that Mosaic would refuse; the block-size
classes refuse such sizes by name (``check_tpu``).

Each test also checks that the kernel's Triton IR holds a ``tt.dot`` (the kernel does the
matmuls itself; a kernel that called the reference inside ``pallas_call`` would not lower
at all) and that the module holds exactly one kernel call and no fallback. On a GPU or TPU
machine the same tests run against the real device (and, with a newer jaxlib, the Triton
IR is compiled to PTX).
"""

from __future__ import annotations

import importlib
import itertools
import re

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.dispatch as dispatch
from kernel_cases import TRITON_COMPILE_SCRIPT
from kernel_lowering import S, assert_one_triton_kernel, lower_for_cuda, lower_for_tpu, packed_causal_args
from pallas_kernels import (
    PagedBlockSizes,
    RaggedBlockSizes,
    flash_attention,
    int8_matmul,
    paged_attention,
    ragged_paged_attention,
)
from pallas_kernels._flash_attention_tpu import flash_attention_tpu
from pallas_kernels._int8_matmul_tpu import int8_matmul_tpu
from pallas_kernels._paged_attention_tpu import paged_attention_tpu
from pallas_kernels._ragged_paged_attention_tpu import ragged_paged_attention_tpu
from pallas_kernels.sparse_matmul import PackedSparse, sparse_matmul



# --- FlashAttention ------------------------------------------------------------------------

FLASH_SHAPES = [  # (T, N, K, H, dtype): prefill at the sizes, a ragged length, GQA 1..8, D 64
    (4096, 32, 8, 128, jnp.bfloat16),
    (4000, 32, 4, 128, jnp.bfloat16),
    (1000, 16, 16, 64, jnp.float32),
    (16384, 64, 8, 128, jnp.bfloat16),
]


def _flash(causal: bool):
    def fn(q, k, v, seg, pos):
        return flash_attention(q, k, v, segment_ids=seg, positions=pos, causal=causal, implementation="pallas")

    return fn


@pytest.mark.parametrize("shape", FLASH_SHAPES, ids=lambda s: f"T{s[0]}-N{s[1]}-K{s[2]}-H{s[3]}")
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_lowers_to_triton(monkeypatch, shape, causal):
    lowered = lower_for_cuda(monkeypatch, _flash(causal), *packed_causal_args(*shape))
    ir = assert_one_triton_kernel(lowered, "flash_attention_packed")
    # The loop over the needed KV blocks only, with no branch in its body (Triton pipelines it).
    assert "scf.for" in ir and "scf.if" not in ir


@pytest.mark.parametrize("shape", FLASH_SHAPES, ids=lambda s: f"T{s[0]}-N{s[1]}-K{s[2]}-H{s[3]}")
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_lowers_to_mosaic_tpu(monkeypatch, shape, causal):
    # Through the public entry point: on a TPU backend flash_attention picks the Mosaic kernel.
    monkeypatch.setattr(dispatch, "backend", lambda: "tpu")
    monkeypatch.setattr(importlib.import_module("pallas_kernels.flash_attention"), "backend", lambda: "tpu")
    text = lower_for_tpu(_flash(causal), *packed_causal_args(*shape))
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 1
    assert "flash_attention_packed_tpu" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flash_attention_tpu_lowers_with_small_blocks(dtype):
    """The block sizes the TPU interpret-mode tests use are legal for Mosaic too (the same object)."""
    from test_flash_attention_tpu import BLOCKS

    fn = lambda q, k, v, seg, pos: flash_attention_tpu(  # noqa: E731
        q, k, v, segment_ids=seg, positions=pos, causal=True, block_sizes=BLOCKS
    )
    text = lower_for_tpu(fn, *packed_causal_args(171, 8, 2, 64, dtype))
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 1


# --- Paged attention -----------------------------------------------------------------------

PAGED_SHAPES = [  # (rows, N, K, H, page size, pages per row): decode batches at serving sizes
    (64, 32, 8, 128, 16, 256),
    (5, 28, 4, 128, 32, 100),
    (32, 16, 16, 64, 16, 64),
]


def _paged_args(shape, pages: str) -> tuple:
    """(q, k_pages, v_pages, page_tables, lengths, [k_scale, v_scale]) structs for a decode batch."""
    b, n, kh, h, page, per_row = shape
    dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32, "int8": jnp.int8}[pages]
    pool = (1 + b * per_row, page, kh, h)
    scales = [S(pool[:3], jnp.float32)] * 2 if pages == "int8" else []
    q = S((b, n, h), jnp.float32 if pages == "f32" else jnp.bfloat16)
    return (q, S(pool, dtype), S(pool, dtype), S((b, per_row), jnp.int32), S((b,), jnp.int32), *scales)


def _paged_fn(kernel):
    def fn(q, kp, vp, tables, lengths, *sc):
        kw = dict(k_scale=sc[0], v_scale=sc[1]) if sc else {}
        return kernel(q, kp, vp, tables, lengths, **kw)

    return fn


def _paged_pallas(q, kp, vp, tables, lengths, **kw):
    return paged_attention(q, kp, vp, tables, lengths, implementation="pallas", **kw)


def _paged_tpu(q, kp, vp, tables, lengths, **kw):
    rows = dict(segment_ids=jnp.arange(q.shape[0], dtype=jnp.int32), positions=lengths - 1)
    return paged_attention_tpu(q, kp, vp, tables, lengths, **rows, **kw)


@pytest.mark.parametrize("shape", PAGED_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("pages", ["bf16", "f32", "int8"])
def test_paged_attention_lowers_to_triton(monkeypatch, shape, pages):
    lowered = lower_for_cuda(monkeypatch, _paged_fn(_paged_pallas), *_paged_args(shape, pages))
    assert_one_triton_kernel(lowered, "paged_attention")


@pytest.mark.parametrize("shape", PAGED_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("pages", ["bf16", "f32", "int8"])
def test_paged_attention_lowers_to_mosaic_tpu(shape, pages):
    text = lower_for_tpu(_paged_fn(_paged_tpu), *_paged_args(shape, pages))
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 1
    assert "paged_attention_tpu" in text


@pytest.mark.parametrize("shape", [(8, 32, 8, 80, 16, 64), (8, 16, 4, 96, 12, 64), (4, 8, 2, 24, 12, 32),
                                   (16, 32, 8, 256, 16, 64)], ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("pages", ["bf16", "int8"])
def test_paged_attention_awkward_sizes_lower_to_triton(monkeypatch, shape, pages):
    """Head dims 80, 96, 24 and page size 12 (not powers of two) lower: the kernel pads its tiles."""
    ir = assert_one_triton_kernel(lower_for_cuda(monkeypatch, _paged_fn(_paged_pallas), *_paged_args(shape, pages)),
                                  "paged_attention")
    h = shape[3]
    if h & (h - 1):  # the padded head dim shows in the tiles
        assert f"x{1 << h.bit_length()}x" in ir


def test_paged_tpu_interpret_cases_lower():
    """The shapes and split counts of the TPU interpret-mode paged tests are legal for Mosaic too."""
    import test_paged_attention as cases

    for case in cases.TPU_CASES:
        b, kh, h = 3, cases.NUM_KV_HEADS, case["head_dim"]
        pool = (cases.NUM_PAGES, cases.PAGE_SIZE, kh, h)
        dtype = jnp.int8 if case["int8"] else case["dtype"]
        scales = [S(pool[:3], jnp.float32)] * 2 if case["int8"] else []
        fn = _paged_fn(lambda *a, **kw: _paged_tpu(*a, **kw, block_sizes=PagedBlockSizes(num_splits=case["splits"])))
        text = lower_for_tpu(fn, S((b, kh * case["group"], h), case["dtype"]), S(pool, dtype), S(pool, dtype),
                             S((b, cases.MAX_PAGES), jnp.int32), S((b,), jnp.int32), *scales)
        assert text.count("stablehlo.custom_call @tpu_custom_call") == 1


def test_paged_attention_multi_query_rows_lower_to_triton(monkeypatch):
    """Chunked prefill / speculative rows: several query tokens per row, padding tokens."""
    t, b, n, kh, h, page, per_row = 40, 8, 32, 8, 128, 16, 128
    pool = (1 + b * per_row, page, kh, h)

    def fn(q, kp, vp, tables, lengths, seg, pos):
        return paged_attention(q, kp, vp, tables, lengths, segment_ids=seg, positions=pos, implementation="pallas",
                               block_sizes=PagedBlockSizes(num_splits=8))

    lowered = lower_for_cuda(monkeypatch, fn, S((t, n, h), jnp.bfloat16), S(pool, jnp.bfloat16),
                             S(pool, jnp.bfloat16), S((b, per_row), jnp.int32), S((b,), jnp.int32),
                             S((t,), jnp.int32), S((t,), jnp.int32))
    assert_one_triton_kernel(lowered, "paged_attention")


# --- Ragged paged attention ---------------------------------------------------------------

RAGGED_SHAPES = [  # (T, rows, N, K, H, page size, pages per row): mixed steps at serving sizes
    (512, 64, 32, 8, 128, 16, 128),  # Llama-3-8B-like: a 512-token step, up to 2k context
    (256, 16, 16, 4, 64, 32, 64),
    (96, 8, 28, 4, 128, 16, 256),  # group 7 (not a power of two), 4k context
    (64, 8, 32, 8, 256, 16, 32),  # head dim 256 (Gemma-like)
]


def _ragged_args(shape, pages: str) -> tuple:
    t, b, n, kh, h, page, per_row = shape
    dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32, "int8": jnp.int8}[pages]
    pool = (1 + b * per_row, page, kh, h)
    scales = [S(pool[:3], jnp.float32)] * 2 if pages == "int8" else []
    q = S((t, n, h), jnp.float32 if pages == "f32" else jnp.bfloat16)
    return (q, S(pool, dtype), S(pool, dtype), S((b, per_row), jnp.int32), S((b,), jnp.int32),
            S((b + 1,), jnp.int32), S((1,), jnp.int32), *scales)


def _ragged_fn(kernel, **opts):
    def fn(q, kp, vp, tables, ctx, cu, num_rows, *sc):
        kw = dict(k_scales=sc[0], v_scales=sc[1]) if sc else {}
        return kernel(q, kp, vp, tables, ctx, cu, num_rows, **kw, **opts)

    return fn


def _ragged_pallas(*args, **kw):
    return ragged_paged_attention(*args, implementation="pallas", **kw)


RAGGED_OPTS = {"plain": {}, "window-softcap": dict(sliding_window=1024, soft_cap=30.0)}


# Every shape, page dtype and option at least once in the default run; the product is @slow.
RAGGED_CASES = [(RAGGED_SHAPES[0], "bf16", "plain"), (RAGGED_SHAPES[1], "int8", "window-softcap"),
                (RAGGED_SHAPES[2], "f32", "window-softcap"), (RAGGED_SHAPES[3], "bf16", "window-softcap")]
RAGGED_ALL = [c for c in itertools.product(RAGGED_SHAPES, ["bf16", "f32", "int8"], RAGGED_OPTS)
              if c not in RAGGED_CASES]


def _ragged_id(case) -> str:
    return "-".join(map(str, case[0])) + f"-{case[1]}-{case[2]}"


def _ragged_params():
    return [pytest.param(*c, id=_ragged_id(c)) for c in RAGGED_CASES] + [
        pytest.param(*c, id=_ragged_id(c), marks=pytest.mark.slow) for c in RAGGED_ALL]


@pytest.mark.parametrize(("shape", "pages", "opts"), _ragged_params())
def test_ragged_paged_attention_lowers_to_triton(monkeypatch, shape, pages, opts):
    fn = _ragged_fn(_ragged_pallas, **RAGGED_OPTS[opts])
    ir = assert_one_triton_kernel(lower_for_cuda(monkeypatch, fn, *_ragged_args(shape, pages)),
                                  "ragged_paged_attention")
    assert "scf.for" in ir  # the loop over the item's KV blocks, inside the kernel


@pytest.mark.parametrize(("shape", "pages", "opts"), _ragged_params())
def test_ragged_paged_attention_lowers_to_mosaic_tpu(shape, pages, opts):
    # int8 pages must be whole 32-row tiles: 32-token pages
    if pages == "int8":
        t, b, n, kh, h, _, per_row = shape
        shape = (t, b, n, kh, h, 32, per_row // 2)
    text = lower_for_tpu(_ragged_fn(ragged_paged_attention_tpu, **RAGGED_OPTS[opts]), *_ragged_args(shape, pages))
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 1
    assert "ragged_paged_attention_tpu" in text


def test_ragged_tpu_interpret_block_sizes_lower():
    """The block sizes and page sizes of the TPU interpret-mode tests are legal for Mosaic too."""
    import test_ragged_paged_attention as cases

    for case in cases.TPU_DEFAULT_CASES:
        blocks = RaggedBlockSizes(block_q=case["block_q"], pages_per_block=case["pages_per_block"])
        pages = "int8" if case["int8"] else {jnp.float32: "f32", jnp.bfloat16: "bf16"}[case["dtype"]]
        kh = cases.NUM_KV_HEADS
        shape = (40, 8, kh * case["group"], kh, case["head_dim"], case["page_size"], 12)
        fn = _ragged_fn(ragged_paged_attention_tpu, block_sizes=blocks, sliding_window=case.get("window"),
                        soft_cap=case.get("soft_cap"))
        text = lower_for_tpu(fn, *_ragged_args(shape, pages))
        assert text.count("stablehlo.custom_call @tpu_custom_call") == 1


# --- int8 and sparse matmul ----------------------------------------------------------------

MATMUL_SHAPES = [  # (M, K, N): OPT-66B-like FFN and attention projections, batch 1 to 32
    (1, 7168, 28672),
    (8, 28672, 7168),
    (32, 7168, 7168),
    (3, 4096, 11008),
]


@pytest.mark.parametrize("mkn", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_matmul_lowers_to_triton(monkeypatch, mkn):
    m, k, n = mkn
    fn = lambda x, w, s: int8_matmul(x, w, s, implementation="pallas")  # noqa: E731
    lowered = lower_for_cuda(monkeypatch, fn, S((m, k), jnp.bfloat16), S((k, n), jnp.int8), S((n,), jnp.float32))
    assert_one_triton_kernel(lowered, "int8_matmul")


@pytest.mark.parametrize("mkn", MATMUL_SHAPES + [(7, 1000, 300)], ids=lambda s: "x".join(map(str, s)))
def test_int8_matmul_lowers_to_mosaic_tpu(mkn):
    m, k, n = mkn
    text = lower_for_tpu(int8_matmul_tpu, S((m, k), jnp.bfloat16), S((k, n), jnp.int8), S((n,), jnp.float32))
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 1
    assert "int8_matmul_tpu" in text


def _packed_struct(k: int, n: int, sparsity: float, tile: int = 64) -> PackedSparse:
    """A PackedSparse of shape structs: what pack_sparse returns for a [K, N] weight at that sparsity."""
    kt, nt = -(-k // tile), -(-n // tile)
    nnz = int((1 - sparsity) * k * n)
    return PackedSparse(
        values=S((nnz,), jnp.bfloat16), bitmap=S((kt * nt * tile * tile // 32,), jnp.uint32),
        tile_offsets=S((kt * nt + 1,), jnp.int32), shape=(k, n), tile_k=tile, tile_n=tile,
    )


@pytest.mark.parametrize("mkn", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sparse_matmul_lowers_to_triton(monkeypatch, mkn):
    m, k, n = mkn
    fn = lambda x, p: sparse_matmul(x, p, implementation="pallas")  # noqa: E731
    lowered = lower_for_cuda(monkeypatch, fn, S((m, k), jnp.bfloat16), _packed_struct(k, n, 0.8))
    ir = assert_one_triton_kernel(lowered, "sparse_matmul")
    assert "arith.shrui" in ir  # bitmap words are expanded on chip


def test_packed_struct_matches_pack_sparse():
    """The shape structs above are what pack_sparse really produces (so the lowered shapes are real)."""
    from pallas_kernels.sparse_matmul import pack_sparse

    rng = np.random.default_rng(0)
    w = rng.standard_normal((200, 136)).astype(np.float32)
    w[rng.random(w.shape) < 0.8] = 0.0
    packed = pack_sparse(jnp.asarray(w, jnp.bfloat16))
    want = _packed_struct(200, 136, 0.0)
    for name in ("bitmap", "tile_offsets"):
        assert getattr(packed, name).shape == getattr(want, name).shape
        assert getattr(packed, name).dtype == getattr(want, name).dtype
    assert packed.values.dtype == jnp.bfloat16 and packed.values.size == np.count_nonzero(w)
    assert (packed.shape, packed.tile_k, packed.tile_n) == (want.shape, want.tile_k, want.tile_n)


# --- dispatch: implementation="auto" on each backend ----------------------------------------


def _on_backend(monkeypatch, name: str) -> None:
    """Make every op module see ``name`` as the default backend."""
    for module in ("dispatch", "flash_attention", "paged_attention", "int8_matmul", "sparse_matmul"):
        mod = importlib.import_module(f"pallas_kernels.{module}")
        if hasattr(mod, "backend"):
            monkeypatch.setattr(mod, "backend", lambda: name)


def _auto_ops():
    """(name, fn, args) of each op at a small shape, called with implementation="auto"."""
    t, b, pool = 64, 4, (17, 16, 2, 128)
    return [
        ("flash_attention", lambda q, k, v, seg, pos: flash_attention(q, k, v, segment_ids=seg, positions=pos),
         packed_causal_args(t, 8, 2, 128, jnp.bfloat16)),
        ("paged_attention", lambda q, kp, vp, tb, ln: paged_attention(q, kp, vp, tb, ln),
         (S((b, 8, 128), jnp.bfloat16), S(pool, jnp.bfloat16), S(pool, jnp.bfloat16), S((b, 4), jnp.int32),
          S((b,), jnp.int32))),
        ("int8_matmul", lambda x, w, s: int8_matmul(x, w, s),
         (S((2, 256), jnp.bfloat16), S((256, 512), jnp.int8), S((512,), jnp.float32))),
    ]


@pytest.mark.parametrize("op", ["flash_attention", "paged_attention", "int8_matmul"])
def test_auto_picks_mosaic_on_tpu(monkeypatch, op):
    monkeypatch.delenv("ENERGON_KERNELS", raising=False)
    _on_backend(monkeypatch, "tpu")
    [(_, fn, args)] = [o for o in _auto_ops() if o[0] == op]
    text = lower_for_tpu(fn, *args)
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 1


@pytest.mark.parametrize("op", ["flash_attention", "paged_attention", "int8_matmul", "sparse_matmul"])
def test_auto_picks_triton_on_gpu(monkeypatch, op):
    monkeypatch.delenv("ENERGON_KERNELS", raising=False)
    _on_backend(monkeypatch, "gpu")
    if op == "sparse_matmul":
        fn, args = (lambda x, p: sparse_matmul(x, p)), (S((8, 256), jnp.bfloat16), _packed_struct(256, 512, 0.8))
    else:
        [(_, fn, args)] = [o for o in _auto_ops() if o[0] == op]
    lowered = lower_for_cuda(monkeypatch, fn, *args)
    assert lowered.kernel_calls() == 1 and len(lowered.triton_ir) == 1


def test_sparse_matmul_on_tpu_uses_the_reference_or_says_why(monkeypatch):
    """No Mosaic sparse kernel: "auto" on TPU runs the reference; a forced "pallas" is a clear error."""
    monkeypatch.delenv("ENERGON_KERNELS", raising=False)
    _on_backend(monkeypatch, "tpu")
    args = (S((8, 256), jnp.bfloat16), _packed_struct(256, 512, 0.8))
    text = lower_for_tpu(lambda x, p: sparse_matmul(x, p), *args)
    assert "tpu_custom_call" not in text
    with pytest.raises(ValueError, match="sparse_matmul has no TPU kernel"):
        lower_for_tpu(lambda x, p: sparse_matmul(x, p, implementation="pallas"), *args)


# --- beyond lowering: Triton IR -> PTX -> cubin without a GPU (a manual check) -------------
#
#     python tests/test_kernel_lowering.py DIR
#
# writes the Triton IR of every kernel at the shapes above (DIR/<case>.ttir, the launch
# parameters in DIR/<case>.json) and DIR/compile_ttir.py, which compiles each with OpenAI
# Triton's own pipeline (ttir -> ttgir -> llir -> ptx -> cubin, ptxas included in the wheel)
# for sm_90 and sm_80. Triton is not a project dependency: run that script in any Python
# with ``pip install triton`` (its MLIR is kept out of the jax process on purpose).

def _cuda_cases():
    """(name, fn, args) of every kernel case lowered for CUDA above."""
    for t, n, k, h, dtype in FLASH_SHAPES:
        yield f"flash_T{t}_N{n}_K{k}_H{h}_{jnp.dtype(dtype).name}", _flash(True), packed_causal_args(t, n, k, h, dtype)
    for shape in PAGED_SHAPES:
        for pages in ("bf16", "f32", "int8"):
            yield f"paged_{'_'.join(map(str, shape))}_{pages}", _paged_fn(_paged_pallas), _paged_args(shape, pages)
    for shape, pages, opts in RAGGED_CASES:
        yield (f"ragged_{'_'.join(map(str, shape))}_{pages}_{opts}", _ragged_fn(_ragged_pallas, **RAGGED_OPTS[opts]),
               _ragged_args(shape, pages))
    for m, k, n in MATMUL_SHAPES:
        args = (S((m, k), jnp.bfloat16), S((k, n), jnp.int8), S((n,), jnp.float32))
        yield f"int8_{m}x{k}x{n}", (lambda x, w, s: int8_matmul(x, w, s, implementation="pallas")), args
        yield (f"sparse_{m}x{k}x{n}", (lambda x, p: sparse_matmul(x, p, implementation="pallas")),
               (S((m, k), jnp.bfloat16), _packed_struct(k, n, 0.8)))


def dump_triton_ir(out_dir: str) -> None:
    import json
    import pathlib

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, fn, args in _cuda_cases():
            lowered = lower_for_cuda(monkeypatch, fn, *args)
            [ir] = lowered.triton_ir
            text = lowered.module or ""
            launch = {key: int(v) for key in ("num_warps", "num_stages")
                      for v in re.findall(rf"{key} = (\d+) : i32", text)[:1]}
            (out / f"{name}.ttir").write_text(ir)
            (out / f"{name}.json").write_text(json.dumps(launch))
            print(name, launch)
    (out / "compile_ttir.py").write_text(TRITON_COMPILE_SCRIPT)
    print(f"now: python {out / 'compile_ttir.py'}  (in a Python with `pip install triton`)")


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/test_kernel_lowering.py OUT_DIR")
    dump_triton_ir(sys.argv[1])
