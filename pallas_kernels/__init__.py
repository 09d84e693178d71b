"""Attention and matmul kernels: a Pallas kernel per backend and a plain-jnp reference for each op."""

from pallas_kernels.block_sizes import FlashBlockSizes, MatmulBlockSizes, PagedBlockSizes, RaggedBlockSizes
from pallas_kernels.dispatch import resolve_implementation
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.page_layout import (
    NULL_PAGE,
    KVCache,
    KVPages,
    PagedAttentionMetadata,
    make_kv_pages,
    page_bytes,
    write_kv,
)
from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_reference, quantize_weight_int8
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels._paged_attention_xla import paged_attention_xla
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.sparse_matmul import (
    PackedSparse,
    pack_sparse,
    sparse_matmul,
    sparse_matmul_reference,
    unpack_sparse,
)

__all__ = [
    "FlashBlockSizes",
    "MatmulBlockSizes",
    "PackedSparse",
    "PagedBlockSizes",
    "RaggedBlockSizes",
    "int8_matmul",
    "int8_matmul_reference",
    "pack_sparse",
    "quantize_weight_int8",
    "sparse_matmul",
    "sparse_matmul_reference",
    "unpack_sparse",
    "NULL_PAGE",
    "KVCache",
    "KVPages",
    "PagedAttentionMetadata",
    "flash_attention",
    "flash_attention_reference",
    "make_kv_pages",
    "page_bytes",
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_xla",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "resolve_implementation",
    "write_kv",
]
