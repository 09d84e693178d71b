"""Block sizes of the Pallas kernels: frozen dataclasses that validate themselves.

Defaults are for the Triton lowering on NVIDIA GPUs (power-of-two tiles that keep a
query block, a KV block and the accumulator in registers/shared memory). Tests pass
small blocks so that interpret mode on CPU walks many blocks in a few milliseconds.
No table of tuned sizes yet: add one keyed by device and shape when a device run measures
them, and read it where the defaults are chosen.
"""

from __future__ import annotations

import dataclasses


def _check_pow2(name: str, value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two >= 1 (Triton tiles are power-of-two sized)")


# Mosaic (TPU) tiles the last two dims of every VMEM block as (sublanes, 128 lanes); a
# 32-bit value fills 8 sublanes, narrower types pack more rows into one tile.
TPU_LANES = 128


def tpu_sublanes(dtype) -> int:
    """Rows of one Mosaic tile for ``dtype``: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit types."""
    import numpy as np

    return 8 * (4 // np.dtype(dtype).itemsize)


def _check_multiple(name: str, value: int, multiple: int, why: str) -> None:
    if value % multiple:
        raise ValueError(f"{name}={value} must be a multiple of {multiple} for the TPU kernel ({why})")


@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
    """Query tokens per program (``block_q``) and KV tokens per inner step (``block_k``)."""

    block_q: int = 64
    block_k: int = 64

    def __post_init__(self) -> None:
        _check_pow2("block_q", self.block_q)
        _check_pow2("block_k", self.block_k)

    def check_tpu(self) -> None:
        """Mosaic's tiling: the query block is a sublane dim (query ids are ``[block_q, 1]``
        columns), the key block a lane dim (key ids are ``[1, block_k]`` rows)."""
        _check_multiple("block_q", self.block_q, 8, "query rows are tiled 8 sublanes at a time")
        _check_multiple("block_k", self.block_k, TPU_LANES, "key ids are a [1, block_k] row on 128 lanes")


@dataclasses.dataclass(frozen=True)
class RaggedBlockSizes:
    """Tiles of ``ragged_paged_attention``.

    ``block_q``: query tokens of one row per work item (the tile is ``block_q x G`` rows:
    every query head of a KV group). ``pages_per_block``: pages read per KV step (one
    DMA each on TPU, double-buffered; one gathered ``[pages_per_block * S, H]`` load on
    GPU). ``num_splits``: KV ranges per work item reduced afterwards (split-K, GPU only;
    ``None``: enough programs to fill the GPU). ``min_rows``: the query tile is padded to
    at least this many rows (``tl.dot`` needs 16 on GPU; 1 keeps interpret mode cheap).
    """

    block_q: int = 16
    pages_per_block: int = 8
    num_splits: int | None = None
    min_rows: int = 1

    def __post_init__(self) -> None:
        _check_pow2("block_q", self.block_q)
        if self.pages_per_block < 1:
            raise ValueError(f"pages_per_block={self.pages_per_block} must be >= 1")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be >= 1 (or None for the default)")
        _check_pow2("min_rows", self.min_rows)

    def check_tpu(self, *, page_size: int, group: int, head_dim: int, kv_dtype) -> None:
        """Mosaic's tiling for the TPU kernel (raises ValueError naming the field and the rule).

        Pages land in VMEM at row ``i * page_size`` of a ``[pages_per_block * S, K * H]``
        buffer, so a page must be whole sublane tiles of the pool dtype; the query tile
        ``[block_q * G, H]`` must be whole 8-row tiles; a head's keys are a lane slice
        ``[:, k*H:(k+1)*H]``, whole 128-lane tiles only when ``H`` is a multiple of 128
        (64 is the one narrower head dim allowed: half a tile, a masked lane shift).
        """
        _check_multiple("page_size", page_size, tpu_sublanes(kv_dtype),
                        f"a page is DMA'd into whole {jnp_name(kv_dtype)} sublane tiles")
        _check_multiple("block_q * group", self.block_q * group, 8, "the query tile is whole 8-row tiles")
        if head_dim % TPU_LANES and head_dim != 64:
            raise ValueError(f"head_dim={head_dim} must be 64 or a multiple of {TPU_LANES} for the TPU kernel "
                             "(each KV head is a lane slice of the page)")


def jnp_name(dtype) -> str:
    import numpy as np

    return np.dtype(dtype).name


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
