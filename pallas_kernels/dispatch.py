"""Choosing an implementation for each op: the Pallas kernel for the backend, an XLA path, or the jnp reference.

``implementation="auto"`` resolves to ``"pallas"`` on TPU and GPU and, elsewhere (CPU;
interpret mode is for tests only), to ``"xla"`` for an op that has an XLA path (one
written for speed with plain XLA ops; ``paged_attention`` only) and to ``"reference"``
for the others. An op without an XLA path treats ``"xla"`` as ``"reference"``. The
environment variable ``ENERGON_KERNELS=reference|xla|pallas|auto`` overrides ``"auto"``
for a whole run; an explicit ``"pallas"``, ``"xla"`` or ``"reference"`` argument always wins.

Pallas has no compiled CPU backend, so a Pallas kernel chosen on CPU (forced by the
argument or the environment) runs in interpret mode (``use_interpret``): that is how
a whole model runs with the kernels forced on in CPU tests.
"""

from __future__ import annotations

import os

import jax

IMPLEMENTATIONS = ("auto", "pallas", "xla", "reference")
ENV_VAR = "ENERGON_KERNELS"
# Kernels written for the Triton lowering only (sparse_matmul: its on-chip expansion gathers
# from a tile, which Mosaic cannot): on TPU, "auto" uses the reference for them. The other
# ops have a Mosaic variant (``_*_tpu.py``).
GPU_ONLY = ("gpu",)


def resolve_implementation(
    implementation: str,
    *,
    interpret: bool = False,
    backends: tuple[str, ...] = ("tpu", "gpu"),
    has_xla: bool = False,
) -> str:
    """Return ``"pallas"``, ``"xla"`` or ``"reference"`` for this call.

    ``backends``: where ``"auto"`` picks the kernel (an op whose kernel has no variant for
    a backend yet lists only the others, and ``"auto"`` falls back there). ``has_xla``:
    whether the op has an XLA path; ``"auto"`` falls back to it where there is no kernel,
    and without one ``"xla"`` (argument or environment) means ``"reference"``, so the
    result is never ``"xla"`` for such an op.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{implementation=} must be one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower()
        if env not in IMPLEMENTATIONS:
            raise ValueError(f"{ENV_VAR}={env!r} must be one of {IMPLEMENTATIONS}")
        if env != "auto":
            implementation = env
        elif interpret:
            implementation = "pallas"
        else:
            implementation = "pallas" if backend() in backends else "xla"
    if implementation == "xla" and not has_xla:
        return "reference"
    return implementation


def backend() -> str:
    """The default backend's platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    return jax.default_backend()


def use_interpret(interpret: bool) -> bool:
    """``interpret`` as asked, or True on CPU, where Pallas can only interpret."""
    return interpret or backend() == "cpu"


def gpu_compiler_params(*, interpret: bool, num_warps: int | None = None, num_stages: int | None = None):
    """Triton compiler parameters when compiling for a GPU, else None.

    The kernels here are written for the Triton lowering (generic ``pallas_call`` with
    BlockSpecs); recent jax sends a ``pallas_call`` without compiler parameters to Mosaic
    GPU instead, which these kernels do not target. Passing Triton parameters picks the
    Triton lowering explicitly.
    """
    if interpret or backend() != "gpu":
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
