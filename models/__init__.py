"""The model zoo: Flax NNX models that load Hugging Face checkpoints.

``load(path, dtype)`` returns ``(model, config)`` from a Hugging Face safetensors
directory or an orbax directory written by ``energon convert``; ``load_config(path)``
reads only the config; ``supported_architectures()`` lists what ``config.json``'s
``architectures`` may name. Each family lives in its own module (``llama``, ``mixtral``,
``gpt2``, ``opt``, ``bert``); ``registry.py`` maps architecture names to them.
"""

from models.config import ModelConfig, RopeScaling
from models.loading import WeightSpec, abstract_model, load, load_config, parse_dtype
from models.registry import supported_architectures

__all__ = [
    "ModelConfig",
    "RopeScaling",
    "WeightSpec",
    "abstract_model",
    "load",
    "load_config",
    "parse_dtype",
    "supported_architectures",
]
