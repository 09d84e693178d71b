"""Block sizes of the Pallas kernels: frozen dataclasses that validate themselves.

Defaults are for the Triton lowering on NVIDIA GPUs (power-of-two tiles that keep a
query block, a KV block and the accumulator in registers/shared memory). Tests pass
small blocks so that interpret mode on CPU walks many blocks in a few milliseconds.
Tuned sizes keyed by device and shape belong in ``TUNED`` once a GPU run measures them.
"""

from __future__ import annotations

import dataclasses


def _check_pow2(name: str, value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two >= 1 (Triton tiles are power-of-two sized)")


@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
    """Query tokens per program (``block_q``) and KV tokens per inner step (``block_k``)."""

    block_q: int = 64
    block_k: int = 64

    def __post_init__(self) -> None:
        _check_pow2("block_q", self.block_q)
        _check_pow2("block_k", self.block_k)


@dataclasses.dataclass(frozen=True)
class PagedBlockSizes:
    """``num_splits``: context blocks processed in parallel per (token, KV head) (split-K).
    ``None``: on a GPU enough splits for ``SPLIT_K_TARGET_PROGRAMS`` programs (a batch-1 decode
    with 8 KV heads would otherwise run 8 x 4 programs on 132 SMs), elsewhere 4.

    ``min_group_rows``: query heads of one KV group are padded to at least this many rows
    (``tl.dot`` needs 16 rows on GPU; 1 keeps interpret mode cheap).
    """

    num_splits: int | None = None
    min_group_rows: int = 1

    def __post_init__(self) -> None:
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be >= 1 (or None for the default)")
        _check_pow2("min_group_rows", self.min_group_rows)

    def splits(self, *, programs: int, num_pages: int, on_gpu: bool) -> tuple[int, int]:
        """``(splits, pages_per_split)`` for ``programs`` (token, KV head) pairs and ``num_pages`` per row."""
        wanted = self.num_splits if self.num_splits is not None or on_gpu else 4
        return split_k(wanted, programs=programs, num_k_blocks=num_pages, on_gpu=on_gpu)


@dataclasses.dataclass(frozen=True)
class MatmulBlockSizes:
    """Output tile ``block_m x block_n`` per program; ``block_k`` rows of the weight per step.

    ``num_splits``: K is cut into this many ranges reduced in float32 afterwards (split-K),
    so that a small-batch matmul with few output tiles still has enough programs to keep
    every SM streaming weights. ``None``: enough splits for ``SPLIT_K_TARGET_PROGRAMS`` when
    compiling for a GPU, 1 otherwise (the GPU kernels; the TPU kernel ignores it).
    """

    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    num_splits: int | None = None

    def __post_init__(self) -> None:
        _check_pow2("block_m", self.block_m)
        _check_pow2("block_n", self.block_n)
        _check_pow2("block_k", self.block_k)
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be >= 1 (or None for the heuristic)")


# Programs a split-K matmul aims for: two per SM of an H100 (132 SMs). Without split-K an
# OPT down projection at batch 1 (N=7168, 128-wide tiles) has 56 programs, under half the SMs.
SPLIT_K_TARGET_PROGRAMS = 264


def split_k(num_splits: int | None, *, programs: int, num_k_blocks: int, on_gpu: bool) -> tuple[int, int]:
    """``(splits, k_blocks_per_split)`` for a grid of ``programs`` output tiles; no split is empty.

    An explicit ``num_splits`` is an upper bound; ``None`` on a GPU gives at least enough
    splits for ``SPLIT_K_TARGET_PROGRAMS`` programs (as far as there are K blocks to split).
    """
    if num_splits is None and on_gpu:
        wanted = min(-(-SPLIT_K_TARGET_PROGRAMS // programs), num_k_blocks)
        per_split = max(1, num_k_blocks // wanted)
    else:
        per_split = -(-num_k_blocks // max(1, min(num_splits or 1, num_k_blocks)))
    return -(-num_k_blocks // per_split), per_split


# (device_kind, op) -> tuned block sizes. Empty until a GPU run fills it in.
TUNED: dict[tuple[str, str], object] = {}
