"""From sampled token ids to what a user sees: text deltas, stop strings, hold-back.

One ``OutputTracker`` per request, owned by the engine's step-loop thread. Each step's
new token ids go through the request's ``IncrementalDetokenizer``; the tracker then

- looks for the request's stop strings in the text, including matches that straddle
  token boundaries (it searches from a little before the new text), and cuts the text
  before the first match (the stop string is never part of the output);
- holds back, while streaming, a tail of text that could still be the start of a stop
  string, so that text which later turns out to be a stop string is never emitted;
- emits everything that is left when the request finishes for any reason.

``add_many`` does ``add`` for a whole step's rows at once, their text decoded in one
tokenizer call (``tokenizer.detokenize_many``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from energon_jax.tokenizer import detokenize_many


class OutputTracker:
    """Text state of one request; ``add`` returns the text that may be emitted now."""

    def __init__(self, detokenizer: Any | None, stop: tuple[str, ...]) -> None:
        if stop and detokenizer is None:
            raise ValueError(f"stop={stop!r} needs a tokenizer to match text, and this model has none")
        self._detok = detokenizer
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self.text = ""  # all text so far (cut at a stop string once one matched)
        self._emitted = 0  # characters of ``text`` handed out already
        self.stopped = False  # a stop string matched

    def add(self, token_ids: list[int], *, finished: bool) -> str:
        """Feed new ids; returns the new emittable text. Sets ``stopped`` on a stop-string match."""
        if self._detok is None:
            return ""
        if not self.stopped:
            new = self._detok.add_many(token_ids)
            if finished:
                new += self._detok.flush()
            return self._accept(new, finished)
        return self._accept("", finished)

    def _accept(self, new: str, finished: bool) -> str:
        """Append the decoded ``new`` text (nothing once stopped), match stop strings, cut the delta."""
        if not self.stopped:
            if not self._stop:  # nothing to match or hold back
                self.text += new
                end = len(self.text)
                delta = self.text[self._emitted : end]
                self._emitted = end
                return delta
            start = max(0, len(self.text) - self._max_stop + 1)
            self.text += new
            self._find_stop(start)
        end = len(self.text) if (finished or self.stopped) else len(self.text) - self._held_back()
        end = max(end, self._emitted)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def finish(self) -> str:
        """The rest of the text, when the request ends outside ``add`` (abort)."""
        delta = self.text[self._emitted :]
        self._emitted = len(self.text)
        return delta

    def _find_stop(self, start: int) -> None:
        cut = -1
        for s in self._stop:
            i = self.text.find(s, start)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0


def add_many(trackers: Sequence[OutputTracker], token_ids: Sequence[list[int]], finished: Sequence[bool]) -> list[str]:
    """``[t.add(ids, finished=f) ...]`` for one step's rows (one tracker per request, each at most
    once), decoding every row's new ids in one tokenizer call."""
    detoks = [t._detok for t in trackers]
    if None not in detoks and not any([t.stopped for t in trackers]):  # the usual step
        out = detokenize_many(detoks, token_ids, finished)
        for i, (t, new, f) in enumerate(zip(trackers, out, finished)):
            if t._stop:
                out[i] = t._accept(new, f)
            else:  # no stop strings: all text is emitted as it comes (_accept's first branch)
                t.text += new
                t._emitted += len(new)
        return out
    out = [""] * len(trackers)
    live = [i for i, t in enumerate(trackers) if t._detok is not None and not t.stopped]
    for i, t in enumerate(trackers):
        if t._detok is not None and t.stopped:
            out[i] = t._accept("", finished[i])
    if live:
        texts = detokenize_many([trackers[i]._detok for i in live], [token_ids[i] for i in live],
                                [finished[i] for i in live])
        for i, new in zip(live, texts, strict=True):
            out[i] = trackers[i]._accept(new, finished[i])
    return out
