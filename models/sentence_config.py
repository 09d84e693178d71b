"""A sentence-transformers checkpoint's pipeline: what turns encoder states into an embedding.

sentence-transformers saves, beside the Hugging Face files of the encoder:

- ``modules.json``: the modules applied in order, e.g. Transformer (path ``""``), Pooling
  (``1_Pooling``), Normalize (``2_Normalize``). Releases up to 5.x name their types
  ``sentence_transformers.models.Pooling``, 6.x ``sentence_transformers.<...>.pooling.Pooling``:
  the class name is what counts here;
- ``<pooling path>/config.json``: the pooling mode, as booleans ``pooling_mode_*``
  (up to 5.x) or one ``pooling_mode`` string (6.x); none set means mean, as 6.x reads it;
- ``sentence_bert_config.json``: ``max_seq_length`` (sentence-transformers truncates
  longer inputs to it; without it, the tokenizer's ``model_max_length``) and
  ``do_lower_case`` (lower-case the text before tokenizing).

A module this runtime does not run (``Dense``, ``LayerNorm``, a second Pooling, ...) is a
ValueError: an embedding that silently differs from the checkpoint's is worse than none.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from models.pooling import POOLING_MODES, PoolingConfig

# Pooling modes as sentence-transformers names them (legacy boolean keys, then 6.x names).
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODE_NAMES = {"mean_sqrt_len_tokens": "mean_sqrt_len"}  # 6.x name -> ours
# Module class names (the last part of a modules.json "type").
_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"
# transformers' "no limit" model_max_length (int(1e30)) and anything like it is not a limit.
_NO_LIMIT = 10**9


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """How a sentence-transformers checkpoint pools, normalises and limits its inputs."""

    pooling: PoolingConfig  # mode, and normalize=True when the pipeline has a Normalize module
    max_seq_length: int | None = None  # tokens, special tokens included
    do_lower_case: bool = False


def read_sentence_config(checkpoint_dir: str | Path) -> SentenceConfig | None:
    """The checkpoint's sentence-transformers pipeline, or ``None`` when it has none.

    Without ``modules.json``, a ``1_Pooling/config.json`` alone still sets the pooling
    (no normalisation).
    """
    root = Path(checkpoint_dir)
    pooling_dir, normalize = root / "1_Pooling", False
    modules_file = root / "modules.json"
    if modules_file.is_file():
        pooling_dir, normalize = _read_modules(modules_file)
    config_file = pooling_dir / "config.json"
    if not config_file.is_file():
        if modules_file.is_file():
            raise ValueError(f"{modules_file} names a Pooling module, but {config_file} does not exist")
        return None
    mode = _mode(json.loads(config_file.read_text()), config_file)
    st = _read_json(root / "sentence_bert_config.json")
    max_len = st.get("max_seq_length")
    if max_len is None:
        max_len = _read_json(root / "tokenizer_config.json").get("model_max_length")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 0 < max_len < _NO_LIMIT:
        max_len = None
    return SentenceConfig(
        pooling=PoolingConfig(mode=mode, normalize=normalize),
        max_seq_length=max_len,
        do_lower_case=bool(st.get("do_lower_case", False)),
    )


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text()) if path.is_file() else {}
    return data if isinstance(data, dict) else {}


def _read_modules(modules_file: Path) -> tuple[Path, bool]:
    """``(pooling folder, normalize)`` from ``modules.json``: Transformer, Pooling, optional Normalize."""
    modules = json.loads(modules_file.read_text())
    names = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    expected = [[_TRANSFORMER, _POOLING], [_TRANSFORMER, _POOLING, _NORMALIZE]]
    if names not in expected:
        raise ValueError(
            f"{modules_file}: modules {names} are not supported; supported: Transformer, Pooling, "
            "then optionally Normalize"
        )
    return modules_file.parent / modules[1].get("path", "1_Pooling"), len(names) == 3


def _mode(config: dict, where: Path) -> str:
    if config.get("include_prompt") is False:
        raise ValueError(f"{where}: include_prompt=False is not supported (pooling would have to skip prompt tokens)")
    if "pooling_mode" in config:
        given = config["pooling_mode"]
        modes = [given] if isinstance(given, str) else list(given)
        modes = [_MODE_NAMES.get(m, m) for m in modes]
    else:
        modes = [mode for key, mode in _LEGACY_KEYS.items() if config.get(key)] or ["mean"]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(f"{where}: pooling modes={modes} are not supported; exactly one of {POOLING_MODES} must be set")
    return modes[0]
