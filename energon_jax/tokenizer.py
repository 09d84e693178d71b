"""Tokenizer: the checkpoint's ``tokenizer.json`` (through ``tokenizers``) plus the
special-token ids its config files declare, and a streaming detokenizer.

Where each piece of information comes from, as ``transformers`` reads it:

- the vocabulary, normalizer, pre-tokenizer, decoder and post-processor (which decides
  whether ``encode`` adds a bos token) live in ``tokenizer.json``;
- the names of the special tokens (``bos_token``, ``eos_token``, ``pad_token``,
  ``unk_token``, ``additional_special_tokens``) live in ``tokenizer_config.json`` or
  ``special_tokens_map.json``;
- the model's own ids live in ``config.json`` and ``generation_config.json``, where
  ``eos_token_id`` may be a list (Llama 3 instruct stops on two tokens).

``eos_token_ids`` is the union of everything the checkpoint calls end-of-sequence, so a
generation loop stops on any of them.

``IncrementalDetokenizer`` turns a stream of token ids into text deltas. Byte-level BPE
(and sentencepiece's byte fallback) can split one multi-byte UTF-8 character across
tokens; decoding such a prefix yields U+FFFD, so the detokenizer holds text back until
the character is complete. It decodes a small window (the tokens since the last
emitted boundary) rather than the whole sequence, so each step costs O(window).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

# What a decoder yields for bytes that are not (yet) a complete UTF-8 character.
_REPLACEMENT_CHAR = "\ufffd"
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids(value: Any) -> list[int]:
    """``eos_token_id`` and friends: an int, a list of ints, or absent."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens, resolved from every config file of a checkpoint."""

    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    pad_token_id: int | None
    unk_token_id: int | None
    all_special_ids: frozenset[int]


class Tokenizer:
    """A Hugging Face checkpoint's tokenizer, without ``transformers``.

    Build it with ``Tokenizer.from_pretrained(path)``; the constructor takes an already
    loaded ``tokenizers.Tokenizer`` and the resolved special tokens (tests use it).
    """

    def __init__(self, backend: tokenizers.Tokenizer, special: SpecialTokens) -> None:
        # Padding and truncation stored in tokenizer.json never apply: sentence-transformers
        # checkpoints save a fixed padding to 128 tokens (pads would be fed as input) and a
        # truncation at 128 (text silently dropped). A limit is the engine's to enforce;
        # ``encode_batch(max_length=)`` truncates only where a caller asks.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self.special = special
        self.byte_fallback_ids = _byte_fallback_ids(backend)
        self._truncating: dict[int, tokenizers.Tokenizer] = {}  # max_length -> a truncating copy
        # skip_special_tokens -> {id: decode([id])} (``decode_many``; at most the vocabulary each)
        self._single_text: dict[bool, dict[int, str]] = {False: {}, True: {}}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(
                f"{str(root)!r} has no tokenizer.json: energon-jax reads tokenizers only in the "
                "`tokenizers` format (save a transformers fast tokenizer with save_pretrained "
                "to produce one)"
            )
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        tok_config = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")
        model_config = _read_json(root / "config.json")
        gen_config = _read_json(root / "generation_config.json")

        _register_special_tokens(backend, tok_config, special_map)
        # Whether encode adds bos is the post-processor's call alone: transformers (5.x)
        # likewise ignores tokenizer_config's add_bos_token when tokenizer.json exists.

        def token_id(name: str) -> int | None:
            content = _token_content(tok_config.get(name)) or _token_content(special_map.get(name))
            return backend.token_to_id(content) if content is not None else None

        def config_id(name: str) -> int | None:
            for cfg in (model_config, gen_config):
                found = _ids(cfg.get(name))
                if found:
                    return found[0]
            return None

        bos = token_id("bos_token")
        bos = bos if bos is not None else config_id("bos_token_id")
        eos_ids = set(_ids(model_config.get("eos_token_id"))) | set(_ids(gen_config.get("eos_token_id")))
        tokenizer_eos = token_id("eos_token")
        if tokenizer_eos is not None:
            eos_ids.add(tokenizer_eos)
        pad = token_id("pad_token")
        pad = pad if pad is not None else config_id("pad_token_id")
        unk = token_id("unk_token")

        added_special = {
            token_id_ for token_id_, added in backend.get_added_tokens_decoder().items() if added.special
        }
        named = {i for i in (bos, pad, unk) if i is not None} | eos_ids
        special = SpecialTokens(
            bos_token_id=bos,
            eos_token_ids=frozenset(eos_ids),
            pad_token_id=pad,
            unk_token_id=unk,
            all_special_ids=frozenset(added_special | named),
        )
        return cls(backend, special)

    # -- properties -----------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (for batch encoding and offsets)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.special.bos_token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.special.eos_token_ids

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's primary eos id (the smallest of ``eos_token_ids``), or None."""
        return min(self.special.eos_token_ids) if self.special.eos_token_ids else None

    @property
    def pad_token_id(self) -> int | None:
        return self.special.pad_token_id

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self.special.all_special_ids

    # -- encode / decode --------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the checkpoint's template
        (e.g. a leading bos) is applied, as ``transformers`` does."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True, *, max_length: int | None = None
    ) -> list[list[int]]:
        """Token ids of every text. ``max_length`` truncates each to that many ids, special
        tokens included (the template's [CLS]/[SEP] stay, as transformers' ``truncation=True``)."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
        backend = self._backend if max_length is None else self._truncating_backend(max_length)
        encodings = backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [list(e.ids) for e in encodings]

    def _truncating_backend(self, max_length: int) -> tokenizers.Tokenizer:
        # A copy, so that the shared backend never changes state (other threads encode with it).
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"{max_length=} must be an int >= 1")
        backend = self._truncating.get(max_length)
        if backend is None:
            backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
            backend.enable_truncation(max_length)
            self._truncating[max_length] = backend
        return backend

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. ``skip_special_tokens`` drops the tokens registered as
        special (those of tokenizer.json plus the ones the config files name), as
        transformers does; clean-up of spaces before punctuation is never applied
        (transformers skips it for BPE too: it corrupts code)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_many(self, sequences: Sequence[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """``[decode(ids) for ids in sequences]`` for lists of Python ints (a step's detokenizer windows).

        One-id sequences (every emitted piece of a plain decode step) come from a cache.
        The backend's own ``decode_batch`` is not used: it hands the work to a thread pool,
        which measured 2-6x slower than a plain loop on a loaded 2-core host for these
        one- and two-token windows."""
        decode = self._backend.decode
        single = self._single_text[bool(skip_special_tokens)]
        out = []
        for ids in sequences:
            if len(ids) == 1:
                text = single.get(ids[0])
                if text is None:
                    text = single[ids[0]] = decode(ids, skip_special_tokens=skip_special_tokens)
                out.append(text)
            else:
                out.append(decode(ids, skip_special_tokens=skip_special_tokens))
        return out

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


def _byte_fallback_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids of sentencepiece-style byte tokens ``<0xAB>`` when the model falls back to
    them. Their decoder turns a whole run of them into U+FFFD when the run is not valid
    UTF-8, so the streaming detokenizer must not emit a run before it ends."""
    if not getattr(backend.model, "byte_fallback", False):
        return frozenset()
    ids = []
    for token, token_id in backend.get_vocab(with_added_tokens=False).items():
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            ids.append(token_id)
    return frozenset(ids)


def _register_special_tokens(
    backend: tokenizers.Tokenizer, tok_config: dict[str, Any], special_map: dict[str, Any]
) -> None:
    """Mark the tokens the config files name as special in the backend, as transformers
    does on load, so that ``decode(skip_special_tokens=True)`` drops them and ``encode``
    never splits them. Tokens already in the vocabulary keep their ids."""
    contents: list[str] = []
    for source in (tok_config, special_map):
        for name in _NAMED_SPECIAL_TOKENS:
            content = _token_content(source.get(name))
            if content is not None:
                contents.append(content)
        for extra in source.get("additional_special_tokens") or []:
            content = _token_content(extra)
            if content is not None:
                contents.append(content)
    for entry in (tok_config.get("added_tokens_decoder") or {}).values():
        if isinstance(entry, dict) and entry.get("special") and _token_content(entry):
            contents.append(entry["content"])
    already = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    new = [c for c in dict.fromkeys(contents) if c not in already]
    if new:
        backend.add_special_tokens([tokenizers.AddedToken(c, special=True, normalized=False) for c in new])


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back only the new, complete text.

    Invariant: ``"".join(deltas) + flush() == tokenizer.decode(all_ids)`` for the
    tokenizers energon-jax serves (byte-level BPE and sentencepiece-style BPE with byte
    fallback, whose decoders are local to a token and its neighbour).

    How: ``_prefix_start`` marks the first token of the last emitted piece, ``_read_start``
    the first token not yet emitted. Decoding ``ids[_prefix_start:]`` and subtracting the
    decode of ``ids[_prefix_start:_read_start]`` gives the new text with the right leading
    space (decoders that strip a leading space see the same first token in both). A delta
    that ends in U+FFFD is an incomplete UTF-8 character: held back until the next token;
    so is a trailing run of byte-fallback tokens (its decoder judges the run as a whole).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_start = 0
        self._read_start = 0

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def add(self, token_id: int) -> str:
        """Append one token id; return the text it completes (possibly "")."""
        return self.add_many([token_id])

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Append several ids at once (e.g. the prompt, or a multi-token step)."""
        self._ids.extend(int(t) for t in token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end of the
        stream, decoded as U+FFFD like ``decode`` does). Call once the stream ends."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_start == len(self._ids):
            return ""
        prefix_text, full_text = self._tokenizer.decode_many(self._windows(), self._skip)
        return self._advance(prefix_text, full_text, final)

    def _windows(self) -> list[list[int]]:
        """The two windows whose decodes give the next delta: emitted piece, and it plus the new ids."""
        return [self._ids[self._prefix_start : self._read_start], self._ids[self._prefix_start :]]

    def _advance(self, prefix_text: str, full_text: str, final: bool) -> str:
        """The new text from the decodes of ``_windows()``; moves the window unless held back."""
        if not final and (
            full_text.endswith(_REPLACEMENT_CHAR) or self._ids[-1] in self._tokenizer.byte_fallback_ids
        ):
            return ""
        if not full_text.startswith(prefix_text):
            # A decoder that rewrote already-emitted text (not one of ours): emitted text
            # cannot be taken back, so emit only what extends it.
            common = 0
            for a, b in zip(prefix_text, full_text):
                if a != b:
                    break
                common += 1
            delta = full_text[common:] if len(full_text) > len(prefix_text) else ""
        else:
            delta = full_text[len(prefix_text) :]
        self._prefix_start = self._read_start
        self._read_start = len(self._ids)
        return delta


def detokenize_many(
    detokenizers: Sequence[IncrementalDetokenizer], new_ids: Sequence[Iterable[int]], final: Sequence[bool]
) -> list[str]:
    """``d.add_many(ids) + (d.flush() if f else "")`` for every row of a step (each detokenizer once).

    One Python call per step instead of two wrapped ``decode`` calls and a tracker call
    per row, which is what dominated the host's per-step work: each row costs one backend
    ``decode`` of its window (the emitted piece before it is a single id in a plain decode
    step, taken from ``Tokenizer``'s cache) and a few comparisons; the rare cases go
    through ``_advance``. (A held-back delta followed by ``flush`` equals one emit with
    ``final``: the window does not move while text is held back.)
    """
    out: list[str] = []
    for d, fed, fin in zip(detokenizers, new_ids, final, strict=True):
        ids = d._ids
        ids.extend(fed)  # Python ints (the scheduler's ``tolist``)
        n, start, read = len(ids), d._prefix_start, d._read_start
        if read == n:
            out.append("")
            continue
        tok, skip = d._tokenizer, d._skip
        if read - start == 1:
            prefix_text = tok._single_text[skip].get(ids[start])
            if prefix_text is None:
                prefix_text = tok.decode_many([ids[start:read]], skip)[0]
        else:
            prefix_text = tok._backend.decode(ids[start:read], skip_special_tokens=skip)
        full_text = tok._backend.decode(ids[start:], skip_special_tokens=skip)
        if fin or not (full_text.endswith(_REPLACEMENT_CHAR) or ids[-1] in tok.byte_fallback_ids):
            if full_text.startswith(prefix_text):  # as _advance, without the rewrite case
                d._prefix_start, d._read_start = read, n
                out.append(full_text[len(prefix_text) :])
                continue
        out.append(d._advance(prefix_text, full_text, fin))
    return out
