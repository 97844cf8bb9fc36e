"""Tool conversations through chat templates: the format each template implies, and a full
round trip (tools, an assistant turn that only calls, a tool result) rendered by every
supported template family. The family templates below are small re-writings of the tool
sections of the real ones (no hub downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from winnow.models.demo_template import DEMO_CHAT_TEMPLATE
from winnow.models.tokenizer import ChatTemplateError, Tokenizer
from winnow.server.errors import ApiError
from winnow.server.prompts import chat_prompt, template_inputs
from winnow.server.protocol import ChatCompletionRequest
from winnow.structured.tool_formats import (
    TOOL_FORMAT_NAMES,
    ToolFormat,
    detect_tool_format,
    tool_format,
)
from winnow.structured.tool_parser import CallArguments, CallOpened, ToolCallParser
from winnow.structured.tool_prompt import EXAMPLES, template_reads_tools, tool_instructions

# Qwen2.5: tools in the system turn, calls as <tool_call> blocks, results as user turns.
QWEN_TEMPLATE = r"""
{%- if tools -%}
<|im_start|>system
{{ messages[0].content if messages[0].role == "system" else "You are Qwen." }}

# Tools

You may call one or more functions to assist with the user query.

<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments
within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == "system" and tools -%}
{%- elif message.role in ("system", "user") -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == "assistant" -%}
<|im_start|>assistant
{{ message.content or "" }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" -%}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
"""

# Llama 3.1: tool list in the first user turn, a call is a bare JSON object with "parameters",
# results come back in the ipython role.
LLAMA_TEMPLATE = r"""
{{- bos_token -}}
{%- for message in messages -%}
{%- if message.role == "user" and loop.first and tools -%}
<|start_header_id|>user<|end_header_id|>

Given the following functions, please respond with a JSON for a function call
with its proper arguments that best answers the given prompt.

Respond in the format {"name": function name, "parameters": dictionary of argument
name and its value}. Do not use variables.

{% for tool in tools %}{{ tool | tojson(indent=4) }}

{% endfor %}{{ message.content }}<|eot_id|>
{%- elif message.role == "assistant" and message.tool_calls -%}
{%- set call = message.tool_calls[0].function -%}
<|start_header_id|>assistant<|end_header_id|>

{"name": "{{ call.name }}", "parameters": {{ call.arguments | tojson }}}<|eot_id|>
{%- elif message.role == "tool" -%}
<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else -%}
<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif -%}
{#- builtin tools would answer after <|python_tag|> -#}
"""

# Mistral v0.3: [AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS] with 9-character ids.
MISTRAL_TEMPLATE = r"""
{{- bos_token -}}
{%- for message in messages -%}
{%- if message.role == "user" -%}
{%- if tools and loop.last -%}
[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]
{%- endif -%}
[INST] {{ message.content }}[/INST]
{%- elif message.role == "assistant" and message.tool_calls -%}
[TOOL_CALLS] [
{%- for call in message.tool_calls -%}
{%- if call.id | length != 9 -%}
{{ raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
{%- endif -%}
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}
{{- ', "id": "' ~ call.id ~ '"}' -}}
{{- ", " if not loop.last -}}
{%- endfor -%}
]{{ eos_token }}
{%- elif message.role == "assistant" -%}
{{ message.content }}{{ eos_token }}
{%- elif message.role == "tool" -%}
[TOOL_RESULTS] {"content": {{ message.content | tojson }}
{{- ', "call_id": "' ~ message.tool_call_id ~ '"}[/TOOL_RESULTS]' -}}
{%- endif -%}
{%- endfor -%}
"""

# SmolLM2-135M-Instruct's ChatML, which knows nothing of tools and concatenates content.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEMPLATES = {
    "qwen": (QWEN_TEMPLATE, "hermes", True),
    "llama": (LLAMA_TEMPLATE, "llama3_json", True),
    "mistral": (MISTRAL_TEMPLATE, "mistral", True),
    "demo": (DEMO_CHAT_TEMPLATE, "mistral", True),
    "chatml": (CHATML_TEMPLATE, "hermes", False),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def family(request: pytest.FixtureRequest, demo_model_dir: Path) -> tuple[Tokenizer, ToolFormat]:
    source, _, _ = TEMPLATES[request.param]
    tokenizer = Tokenizer.from_pretrained(demo_model_dir, chat_template=source)
    return tokenizer, tool_format(detect_tool_format(source), tokenizer.special_token_id)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_format_detected_from_template(name: str) -> None:
    source, expected_format, reads_tools = TEMPLATES[name]
    assert detect_tool_format(source) == expected_format
    assert template_reads_tools(source) is reads_tools


def conversation(call_id: str, content: Any = None) -> ChatCompletionRequest:
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assistant: dict[str, Any] = {"role": "assistant", "tool_calls": [call]}
    if content != "absent":
        assistant["content"] = content
    return ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                assistant,
                {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
                {"role": "user", "content": "And tomorrow?"},
            ],
            "tools": [WEATHER_TOOL],
        }
    )


def rendered(tokenizer: Tokenizer, fmt: ToolFormat, request: ChatCompletionRequest) -> str:
    messages, tools = template_inputs(tokenizer, request.messages, fmt, tools=request.tools)
    return tokenizer.render_chat_text(messages, tools)


@pytest.mark.parametrize("content", [None, "absent", ""])
def test_tool_round_trip_renders(family: tuple[Tokenizer, ToolFormat], content: Any) -> None:
    """Arguments reach the template as a dict, so it writes them as a JSON object (a string
    would come out quoted twice); the result and the tool list are in the prompt."""
    tokenizer, fmt = family
    text = rendered(tokenizer, fmt, conversation(fmt.new_call_id(), content))
    assert '{"city": "Paris"}' in text
    assert '"{\\"city\\"' not in text
    assert "sunny, 21 C" in text
    assert "get_weather" in text and "Current weather in a city" in text
    assert text.count("Weather in Paris?") == 1 and "And tomorrow?" in text
    assert chat_prompt(
        tokenizer, conversation(fmt.new_call_id()).messages, tool_format=fmt, tools=None
    )


def test_plain_template_gets_calls_in_the_default_format(
    demo_model_dir: Path,
) -> None:
    tokenizer = Tokenizer.from_pretrained(demo_model_dir, chat_template=CHATML_TEMPLATE)
    fmt = tool_format("hermes", tokenizer.special_token_id)
    text = rendered(tokenizer, fmt, conversation("call_1"))
    assert "<|im_start|>system\n# Tools" in text
    assert json.dumps(WEATHER_TOOL["function"]) in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in text


def test_mistral_template_refuses_foreign_call_ids(demo_model_dir: Path) -> None:
    """Ids Winnow hands out for the Mistral format pass its template's check; others are the
    client's 400."""
    tokenizer = Tokenizer.from_pretrained(demo_model_dir, chat_template=MISTRAL_TEMPLATE)
    fmt = tool_format("mistral", tokenizer.special_token_id)
    with pytest.raises(ChatTemplateError):
        rendered(tokenizer, fmt, conversation("call_1"))
    with pytest.raises(ApiError) as caught:
        chat_prompt(tokenizer, conversation("call_1").messages, tool_format=fmt)
    assert caught.value.status_code == 400


@pytest.mark.parametrize("name", TOOL_FORMAT_NAMES)
@pytest.mark.parametrize(
    "offered", [["add"], [EXAMPLES[0][1]], [function for _, function, _ in EXAMPLES]]
)
def test_injected_tool_prompt_shows_a_concrete_call(name: str, offered: list[str]) -> None:
    """Small models copy placeholders such as `<function-name>` into their calls, and the values
    of an example call of their own tool: the example is one whole call, in the server's format,
    of a function the request does not offer, closing the example exchange."""
    fmt = tool_format(name, lambda _: None)
    tools = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in offered]
    text = tool_instructions(fmt, tools)
    assert "<function-name>" not in text and "<arguments" not in text
    reply = text.rsplit("\nassistant:\n", 1)[1]
    parser = ToolCallParser(fmt)
    events = [*parser.feed(reply), *parser.finish()]
    framing = [event for event in events if not isinstance(event, CallArguments)]
    assert [type(event) for event in framing] == [CallOpened]  # one call, no text around it
    assert isinstance(framing[0], CallOpened)
    if len(offered) < len(EXAMPLES):
        assert framing[0].name not in offered
    arguments = "".join(e.fragment for e in events if isinstance(e, CallArguments))
    assert json.loads(arguments)
