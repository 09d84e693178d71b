"""Chat templates: the checkpoint's own, rendered in Jinja2's sandbox.

Where the template comes from, first found wins: ``--chat-template FILE``;
``chat_template.jinja`` in the checkpoint; ``chat_template`` in
``tokenizer_config.json`` (a string, or a list of named templates of which
"default" is used). A model with none gets no template: the server never
invents one, and chat requests are refused with a 400 naming ``messages``.

Rendering follows what ``transformers`` gives templates: ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``,
``strftime_now``; ``trim_blocks`` and ``lstrip_blocks`` on. The environment is
``ImmutableSandboxedEnvironment``: a template can read what it is given but not
reach Python internals or mutate its inputs. The rendered text already holds
the BOS the template writes, so it is tokenized without special tokens.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template refused the messages (``raise_exception``) or failed to render them."""


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def find_template_source(model_dir: Path | None, override: Path | None = None) -> str | None:
    """The template text for this checkpoint, or None when it has none (see the module docstring)."""
    if override is not None:
        if not Path(override).is_file():
            raise ValueError(f"--chat-template file {str(override)!r} does not exist")
        return Path(override).read_text(encoding="utf-8")
    if model_dir is None:
        return None
    jinja_file = Path(model_dir) / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    value = _read_json(Path(model_dir) / "tokenizer_config.json").get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


def special_token_texts(model_dir: Path | None) -> tuple[str, str]:
    """``bos_token`` and ``eos_token`` as the template sees them ("" when the checkpoint names none)."""
    if model_dir is None:
        return "", ""
    config = _read_json(Path(model_dir) / "tokenizer_config.json")
    special = _read_json(Path(model_dir) / "special_tokens_map.json")

    def text(name: str) -> str:
        return _token_content(config.get(name)) or _token_content(special.get(name)) or ""

    return text("bos_token"), text("eos_token")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping (Jinja's default would turn < into \u003c).
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class ChatTemplate:
    """One compiled template; ``render`` turns OpenAI messages into the prompt text."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template does not compile: {e}") from e
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def for_checkpoint(cls, model_dir: Path | None, override: Path | None = None) -> ChatTemplate | None:
        source = find_template_source(model_dir, override)
        if source is None:
            return None
        bos, eos = special_token_texts(model_dir)
        return cls(source, bos_token=bos, eos_token=eos)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:  # includes the sandbox's SecurityError
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e
