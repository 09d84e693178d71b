"""Model configuration: one frozen dataclass, built from a Hugging Face ``config.json``.

Families subclass ``ModelConfig`` to add their own fields; the engine only reads the
common ones (layers, heads, head dim, vocab, max length, special tokens).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """``rope_scaling`` of a Hugging Face config; ``rope_type`` "default", "linear" or "llama3"."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, d: dict | None) -> RopeScaling | None:
        if not d:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        known = ("default", "linear", "llama3")
        if rope_type not in known:
            raise ValueError(f"rope_scaling {rope_type=} is not supported; supported: {known}")
        return cls(
            rope_type=rope_type,
            factor=float(d.get("factor", 1.0)),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    is_encoder: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Attention over the KV cache (pallas_kernels.step_attention): "auto" (the ragged kernel on
    # GPU/TPU, XLA on CPU), or forced "pallas" (interpreted on CPU), "xla", "reference".
    attention_implementation: str = "auto"
    # Sliding-window attention (Mistral, Qwen2): each decoder layer's window in tokens (a query
    # at position p sees keys p - W < k <= p), None for a layer with full attention; () when
    # every layer attends to the whole context.
    layer_windows: tuple[int | None, ...] = ()

    def __post_init__(self) -> None:
        from pallas_kernels.dispatch import IMPLEMENTATIONS

        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"config attention_implementation={self.attention_implementation!r} must be one of "
                             f"{IMPLEMENTATIONS}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"config {name}={value} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"config layer_windows has {len(self.layer_windows)} entries; "
                             f"num_layers={self.num_layers}")
        for w in self.layer_windows:
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                raise ValueError(f"config layer_windows entry {w!r} must be an integer >= 1 or None")

    def sliding_window(self, layer: int) -> int | None:
        """Layer ``layer``'s attention window (None: full attention)."""
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def kv_window(self) -> int | None:
        """How many latest positions any layer still reads: the largest window when every layer
        has one (older KV can be dropped), None when some layer sees the whole context."""
        if not self.layer_windows or any(w is None for w in self.layer_windows):
            return None
        return max(self.layer_windows)

    @property
    def is_decoder(self) -> bool:
        return not self.is_encoder


def eos_ids(value: int | list[int] | None) -> tuple[int, ...]:
    """Normalise a config's ``eos_token_id`` (an int, a list, or absent) to a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
