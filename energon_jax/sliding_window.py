"""Releasing the KV pages that sliding-window attention can no longer read.

When every layer of a model attends within a window of ``W`` positions (Mistral, a Qwen2
whose layers all slide; ``ModelConfig.kv_window``), a query at position ``p`` reads keys
``p - W < k <= p`` only. A request's queries only move forward, so once all its future
queries sit at positions ``>= first``, page ``i`` (positions ``[i*S, (i+1)*S)``) is dead
when its last position ``(i+1)*S - 1 <= first - W``: no query will read it again.

The scheduler calls ``release_pages_behind_window`` after a step is done (``update``),
with ``first`` = the tokens written so far: every later query, including one of a plan
already in flight, sits at or after it. Released entries of ``request.pages`` become
``NULL_PAGE`` so the list keeps one entry per page of the sequence (page tables stay
position-indexed); the kernels never read them (they are below every query's window),
and the scheduler frees only ``live_pages`` when the request finishes or is preempted.
Admission takes no prefix-cache hit behind the first fed token's window either.

So a sequence holds about ``W / S`` pages at a time, not ``max_model_len / S``:
``pages_held_at_once`` bounds it, and ``Scheduler.add`` and the engine's pool check (and
the CPU default pool) use that bound instead of the full length.
"""

from __future__ import annotations

from pallas_kernels.page_layout import NULL_PAGE


def pages_behind_window(first_query_pos: int, window: int, page_size: int) -> int:
    """How many leading pages no query at a position ``>= first_query_pos`` can read."""
    if window < 1 or page_size < 1:
        raise ValueError(f"{window=} and {page_size=} must be >= 1")
    return max(0, (first_query_pos - window + 1) // page_size)


def pages_held_at_once(max_model_len: int, page_size: int, window: int | None, max_num_batched_tokens: int) -> int:
    """The most pages one sequence holds at any time: all of ``max_model_len`` without a window.

    With one, after an update it holds pages from its window's start on; before the next
    update it grows by at most two steps' tokens (a plan in flight and the one planned
    ahead), and each end may cut a page: ``ceil((W + 2 * budget) / S) + 2``. A pool of this
    many usable pages always lets a lone request finish.
    """
    full = -(-max_model_len // page_size)
    if window is None:
        return full
    return min(full, -(-(window + 2 * max_num_batched_tokens) // page_size) + 2)


def live_pages(pages: list[int]) -> list[int]:
    """``pages`` without the entries released behind a window (a prefix of ``NULL_PAGE``)."""
    if not pages or pages[0] != NULL_PAGE:
        return pages
    return [p for p in pages if p != NULL_PAGE]


def release_pages_behind_window(pages: list[int], allocator, first_query_pos: int, window: int) -> int:
    """Drop this request's reference to each live page behind the window of its queries from
    ``first_query_pos`` on, and put ``NULL_PAGE`` in its place in ``pages`` (edited in place).

    ``allocator`` is the scheduler's ``PageAllocator``: a page shared through the prefix cache
    keeps its other references (and a published page its hash, on the LRU list). Returns
    how many pages were released.
    """
    dead = min(pages_behind_window(first_query_pos, window, allocator.page_size), len(pages))
    if dead == 0 or pages[dead - 1] == NULL_PAGE:
        return 0  # the released pages are always a prefix: nothing new (O(1) per decode step)
    start = dead - 1
    while start > 0 and pages[start - 1] != NULL_PAGE:
        start -= 1
    allocator.free(pages[start:dead])
    pages[start:dead] = [NULL_PAGE] * (dead - start)
    return dead - start
