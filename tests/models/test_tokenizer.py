"""Tokenizer wrapper and the demo model's Mistral-style chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.models.helpers import tiny_tokenizer
from winnow.models import ChatTemplateError, Tokenizer
from winnow.models.demo import CONTROL_TOKENS

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_model_dir)


def test_basics(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 32768 == len(tokenizer.hf)
    assert tokenizer.eos_token_ids == [2]
    assert tokenizer.bos_token_id == 1
    ids = tokenizer.encode("Hello world")
    assert ids[0] == 1 and len(ids) > 1
    assert tokenizer.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert tokenizer.decode(ids) == "Hello world"
    assert tokenizer.decode(ids + [2], skip_special_tokens=False) == "<s> Hello world</s>"


def test_user_and_system(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.render_chat_text(messages)
    assert text == "<s>[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\nBye[/INST]"
    ids = tokenizer.render_chat(messages)
    assert ids[:2] == [1, 3] and ids[-1] == 4
    assert ids.count(1) == 1  # the template's BOS only, no second one from encoding
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_system_without_user_message(tokenizer: Tokenizer) -> None:
    text = tokenizer.render_chat_text([{"role": "system", "content": "Rules."}])
    assert text == "<s>[INST] Rules.[/INST]"


def test_tools_tool_calls_and_results(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call0", "content": "22C and sunny"},
        {"role": "assistant", "content": "It is 22C."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Rome?"}],
        },
    ]
    text = tokenizer.render_chat_text(messages, tools=TOOLS)
    assert text == (
        "<s>[INST] Weather in Paris?[/INST]"
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call0"}]</s>'
        '[TOOL_RESULTS] {"content": "22C and sunny", "call_id": "call0"}[/TOOL_RESULTS]'
        " It is 22C.</s>"
        f"[AVAILABLE_TOOLS] {json.dumps(TOOLS)}[/AVAILABLE_TOOLS]"
        "[INST] And Rome?[/INST]"
    )
    ids = tokenizer.render_chat(messages, tools=TOOLS)
    for control_id in (3, 4, 5, 6, 7, 8, 9):  # [INST] ... [/TOOL_RESULTS], each a single id
        assert control_id in ids
    plain = tokenizer.decode([i for i in ids if i > 9])
    assert not any(token in plain for token in CONTROL_TOKENS)


def test_tool_call_arguments_as_object(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
        },
    ]
    text = tokenizer.render_chat_text(messages)
    assert text.endswith('[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}]</s>')


def test_template_errors_are_chat_template_errors(tokenizer: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="unsupported message role: wizard"):
        tokenizer.render_chat([{"role": "wizard", "content": "hi"}])
    assert issubclass(ChatTemplateError, ValueError)


def test_missing_template(tmp_path: Path) -> None:
    tiny_tokenizer(10).save_pretrained(str(tmp_path))
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.render_chat([{"role": "user", "content": "hi"}])


def test_chat_template_override_from_string_and_file(tmp_path: Path) -> None:
    tiny_tokenizer(10).save_pretrained(str(tmp_path))
    template = "{% for m in messages %}{{ m.content }} {% endfor %}{{ extra }}"
    tokenizer = Tokenizer.from_pretrained(tmp_path, chat_template=template)
    messages = [{"role": "user", "content": "w4 w5"}]
    assert tokenizer.render_chat(messages, template_kwargs={"extra": "w7"}) == [4, 5, 7]
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    from_file = Tokenizer.from_pretrained(tmp_path, chat_template=str(path))
    assert from_file.render_chat(messages) == [4, 5]
    broken = Tokenizer.from_pretrained(tmp_path, chat_template="{% for %}")
    with pytest.raises(ChatTemplateError):
        broken.render_chat(messages)


def test_eos_ids_include_generation_config(tmp_path: Path) -> None:
    tiny_tokenizer(10).save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 8]}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [2, 7, 8]
