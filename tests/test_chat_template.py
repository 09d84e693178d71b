"""Chat templates: where they come from, how they render, what the sandbox refuses.

Rendering is compared with ``transformers``' ``apply_chat_template`` on the same template
(an independent implementation of the same contract).
"""

from __future__ import annotations

import json

import pytest

from serving.openai.chat_template import ChatTemplate, ChatTemplateError, find_template_source

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_sources_in_order_of_precedence(tmp_path) -> None:
    assert find_template_source(tmp_path) is None  # no template: none is invented
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"},
    ]}))  # fmt: skip
    assert find_template_source(tmp_path) == "D"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "S"}))
    assert find_template_source(tmp_path) == "S"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert find_template_source(tmp_path) == "J"
    override = tmp_path / "mine.jinja"
    override.write_text("O")
    assert find_template_source(tmp_path, override) == "O"
    with pytest.raises(ValueError, match="--chat-template file .* does not exist"):
        find_template_source(tmp_path, tmp_path / "missing.jinja")


def test_render_matches_transformers(tiny_checkpoint, tmp_path) -> None:
    import shutil

    from transformers import AutoTokenizer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>"}]
    template = ChatTemplate.for_checkpoint(ckpt)
    reference = AutoTokenizer.from_pretrained(str(ckpt))
    for gen in (True, False):
        want = reference.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert template.render(messages, add_generation_prompt=gen) == want
    assert template.render(messages).startswith("<s>system")


def test_the_sandbox_and_raise_exception_refuse_with_chat_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="refused the messages: no system role"):
        ChatTemplate("{{ raise_exception('no system role') }}").render([])
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        escape.render([{"role": "user", "content": "x"}])
    mutate = ChatTemplate("{% set _ = messages.append(1) %}{{ messages | length }}")
    with pytest.raises(ChatTemplateError):
        mutate.render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")
