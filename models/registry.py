"""Architecture names (``config.json``'s ``architectures``) to the family module that serves them.

Each family module exports ``ARCHITECTURES``, ``config_from_hf(hf: dict)``, its NNX model
classes, and ``hf_weight_map(config)`` (see docs/architecture.md).
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "models.llama",
    "MistralForCausalLM": "models.llama",
    "Qwen2ForCausalLM": "models.llama",
    "MixtralForCausalLM": "models.mixtral",
    "GPT2LMHeadModel": "models.gpt2",
    "OPTForCausalLM": "models.opt",
    "BertModel": "models.bert",
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def family_for(hf_config: dict) -> tuple[str, ModuleType]:
    """The (architecture, family module) for a Hugging Face config dict."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return arch, importlib.import_module(FAMILIES[arch])
    raise ValueError(
        f"unsupported architectures={archs!r} in config.json; supported: {', '.join(supported_architectures())}"
    )
