"""Shared checks for decoder models: packed batches, the Hugging Face reference, and a
hand-built paged KV cache.

- ``packed(seqs)``: concatenated ids with positions and segment ids (no padding);
- ``hf_logits(ref, seq)``: ``transformers`` logits for one sequence alone (float32);
- ``rel_err(got, want)``: max |got - want| relative to max |want|;
- ``PagedRun``: a page pool with page tables, slot mapping and context lengths built by
  hand (pages handed out in random order, a page size that need not divide the lengths),
  to run chunked prefill and token-by-token decode through a model's cache path.
"""

from __future__ import annotations

import numpy as np

from pallas_kernels import PagedAttentionMetadata, make_kv_pages


def random_seqs(rng: np.random.Generator, lens: list[int], vocab: int) -> list[np.ndarray]:
    return [rng.integers(0, vocab, n).astype(np.int32) for n in lens]


def packed(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids [T], positions [T], segment_ids [T])`` for sequences packed back to back."""
    ids = np.concatenate(seqs).astype(np.int32)
    pos = np.concatenate([np.arange(len(s)) for s in seqs]).astype(np.int32)
    seg = np.concatenate([np.full(len(s), i) for i, s in enumerate(seqs)]).astype(np.int32)
    return ids, pos, seg


def hf_logits(ref, seq: np.ndarray) -> np.ndarray:
    """``[L, V]`` float32 logits of the ``transformers`` model on one sequence alone."""
    import torch

    with torch.no_grad():
        out = ref(torch.tensor(seq, dtype=torch.long)[None])
    return out.logits[0].float().numpy()


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape} != {want.shape}")
    if not np.all(np.isfinite(got)):
        raise AssertionError("non-finite values in the output")
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


class PagedRun:
    """One KV page pool per layer and the bookkeeping of ``B`` sequence rows.

    ``step(chunks)`` feeds ``chunks[r]`` (token ids, possibly empty) of every row ``r`` at
    once, padded with ``-1`` segment tokens to ``pad_to`` so a jitted step keeps one shape;
    it returns the logits of the real tokens of each row.
    """

    def __init__(self, model, config, lens: list[int], *, page_size: int, dtype, seed: int = 0, spare_pages: int = 2):
        self.model, self.page_size = model, page_size
        rng = np.random.default_rng(seed)
        pages_per_row = [-(-n // page_size) for n in lens]
        num_pages = 1 + sum(pages_per_row) + spare_pages
        free = list(rng.permutation(np.arange(1, num_pages)))  # page 0 is the null page
        self.tables = np.zeros((len(lens), max(pages_per_row)), np.int32)
        for r, n in enumerate(pages_per_row):
            for j in range(n):
                self.tables[r, j] = free.pop()
        self.lens = np.zeros(len(lens), np.int32)  # tokens cached per row
        self.cache = tuple(
            make_kv_pages(num_pages, page_size, config.num_kv_heads, config.head_dim, dtype)
            for _ in range(config.num_layers)
        )

    def slot(self, row: int, pos: int) -> int:
        return int(self.tables[row, pos // self.page_size]) * self.page_size + pos % self.page_size

    def step(self, chunks: list[np.ndarray], forward, pad_to: int | None = None) -> list[np.ndarray]:
        ids, pos, seg, slots = [], [], [], []
        for r, chunk in enumerate(chunks):
            for i, tok in enumerate(chunk):
                p = int(self.lens[r]) + i
                ids.append(int(tok)), pos.append(p), seg.append(r), slots.append(self.slot(r, p))
        n_real = len(ids)
        pad = (pad_to or n_real) - n_real
        ids += [0] * pad
        pos += [0] * pad
        seg += [-1] * pad
        slots += [0] * pad  # padding writes into the null page
        self.lens += np.array([len(c) for c in chunks], np.int32)
        meta = PagedAttentionMetadata(
            slot_mapping=np.asarray(slots, np.int32),
            page_tables=self.tables.copy(),
            context_lens=self.lens.copy(),
        )
        logits, self.cache = forward(
            self.model, np.asarray(ids, np.int32), np.asarray(pos, np.int32), np.asarray(seg, np.int32),
            self.cache, meta,
        )
        logits = np.asarray(logits)
        out, start = [], 0
        for chunk in chunks:
            out.append(logits[start:start + len(chunk)])
            start += len(chunk)
        return out


def paged_decode_logits(model, config, seqs: list[np.ndarray], prefill: list[int], *, page_size: int, dtype, forward):
    """Logits of every token of ``seqs`` computed through the cache: a packed prefill of the
    first ``prefill[r]`` tokens of each row, then one token per row per step."""
    run = PagedRun(model, config, [len(s) for s in seqs], page_size=page_size, dtype=dtype)
    per_row: list[list[np.ndarray]] = [[] for _ in seqs]
    first = run.step([s[:p] for s, p in zip(seqs, prefill)], forward)
    for r, lg in enumerate(first):
        per_row[r].append(lg)
    cursor = list(prefill)
    while any(c < len(s) for c, s in zip(cursor, seqs)):
        chunks = [s[c:c + 1] if c < len(s) else s[:0] for c, s in zip(cursor, seqs)]
        outs = run.step(chunks, forward, pad_to=len(seqs))
        for r, lg in enumerate(outs):
            per_row[r].append(lg)
            cursor[r] += len(chunks[r])
    return [np.concatenate(rows, axis=0) for rows in per_row]
