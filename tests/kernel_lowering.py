"""Lowering a function for an accelerator this machine does not have (``jax.export``).

Shared by the lowering tests (``test_kernel_lowering.py``, ``test_sliding_window.py``):
``lower_for_cuda`` runs Pallas -> Triton IR and captures each kernel's IR,
``lower_for_tpu`` runs Pallas -> Mosaic for a TPU v5e given by an abstract mesh. See
``test_kernel_lowering.py``'s docstring for what each lowering checks and what it cannot.
"""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
from jax import export

import pallas_kernels.dispatch as dispatch

TRITON_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")
S = jax.ShapeDtypeStruct


class CudaLowering:
    """What lowering one function for "cuda" produced."""

    def __init__(self, module: str | None, triton_ir: list[str], error: str | None):
        self.module = module  # StableHLO text, None when lowering stopped at the Triton compile step
        self.triton_ir = triton_ir  # one Triton module (text) per pallas_call
        self.error = error

    def kernel_calls(self) -> int:
        if self.module is None:
            return len(self.triton_ir)
        return sum(len(re.findall(rf"stablehlo.custom_call @{re.escape(t)}\b", self.module)) for t in TRITON_TARGETS)


def lower_for_cuda(monkeypatch, fn, *args) -> CudaLowering:
    """Export ``fn`` for CUDA; the kernels see a GPU backend, so they ask for the Triton lowering."""
    from jax._src.lib import triton as triton_lib
    from jax._src.pallas.triton import lowering as triton_lowering

    monkeypatch.setattr(dispatch, "backend", lambda: "gpu")
    captured: list[str] = []
    build = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*a, **kw):
        result = build(*a, **kw)
        captured.append(str(result.module))
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", capture)
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in TRITON_TARGETS]
    try:
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    except RuntimeError as e:
        # Newer jaxlib without the CUDA plugin: the IR was built, only PTX compilation is missing.
        if "Triton compilation handler" not in str(e) or triton_lib.has_compilation_handler("cuda"):
            raise
        return CudaLowering(None, captured, str(e))
    return CudaLowering(exported.mlir_module(), captured, None)


@contextlib.contextmanager
def tpu_target(device_kind: str = "TPU v5 lite"):
    """Lower for a TPU chip without one: Mosaic reads the chip from the abstract mesh's device."""
    if jax.default_backend() == "tpu":
        yield
        return
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        yield


def lower_for_tpu(fn, *args) -> str:
    with tpu_target():
        return export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def assert_one_triton_kernel(lowered: CudaLowering, name: str) -> str:
    """Exactly one Pallas kernel, built as Triton IR with its own matmul; returns its IR."""
    assert lowered.kernel_calls() == 1, lowered.module
    [ir] = lowered.triton_ir
    assert re.search(rf"tt.func public @{name}\b", ir), ir[:2000]
    assert "tt.dot" in ir  # the matmuls run on tensor cores inside the kernel
    if lowered.module is not None:
        assert any(f"@{t}" in lowered.module for t in TRITON_TARGETS)
        assert "tpu_custom_call" not in lowered.module and "mosaic_gpu" not in lowered.module
    return ir


def packed_causal_args(t: int, n: int, kh: int, h: int, dtype) -> tuple:
    return S((t, n, h), dtype), S((t, kh, h), dtype), S((t, kh, h), dtype), S((t,), jnp.int32), S((t,), jnp.int32)
