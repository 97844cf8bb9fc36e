"""Tools for chat templates that know nothing of tools (SmolLM2's ChatML, plain templates).

Such a template never reads `tools`, so the tool list would silently vanish from the prompt.
Instead the list is written into the system message with instructions to answer in the server's
tool-call format (Hermes by default), earlier calls become assistant text in that format, and
tool results become user turns wrapped in `<tool_response>` tags, as Qwen's template writes them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta

from winnow.structured.tool_formats import ToolFormat


@lru_cache(maxsize=8)
def template_reads_tools(template: str | None) -> bool:
    """Whether the template source uses the `tools` variable at all."""
    if not template:
        return False
    try:
        parsed = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in meta.find_undeclared_variables(parsed)


# Example exchanges (question, function, arguments) with made-up functions: the first the request
# does not offer is shown (the last when it offers them all). Small models copy the values of an
# example call of their own tool (SmolLM2 wrote the example's `input: 1` when asked for
# `input: 3`), and copy placeholders such as `<function-name>` verbatim.
EXAMPLES: tuple[tuple[str, str, str], ...] = (
    ("What is the weather in Paris?", "get_weather", '{"city": "Paris"}'),
    ("Convert 20 euros to dollars.", "convert_currency", '{"amount": 20, "to": "USD"}'),
)


def tool_instructions(fmt: ToolFormat, tools: list[dict[str, Any]]) -> str:
    """The tool list, and the call format shown as a whole exchange: a user line, then an
    assistant reply that is one call and nothing after it (shown so, SmolLM2 ends its turn
    after a forced call more surely than after a bare example call, where it repeated it)."""
    listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    offered = {tool["function"]["name"] for tool in tools}
    unused = (example for example in EXAMPLES if example[1] not in offered)
    question, name, arguments = next(unused, EXAMPLES[-1])
    example = fmt.render_calls([(name, arguments)])
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "To call a function, reply with its name and arguments. An example exchange, "
        f"with a function {name}:\n\n"
        f"user: {question}\n"
        f"assistant:\n{example}"
    )


def with_tools_in_prompt(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, fmt: ToolFormat
) -> list[dict[str, Any]]:
    """The conversation with the tool list in the system message and the tool turns as text."""
    rendered = [_as_text_turn(message, fmt) for message in messages]
    if tools:
        instructions = tool_instructions(fmt, tools)
        if rendered and rendered[0]["role"] == "system":
            system = rendered[0]["content"] or ""
            rendered[0] = {**rendered[0], "content": f"{system}\n\n{instructions}".lstrip()}
        else:
            rendered.insert(0, {"role": "system", "content": instructions})
    return rendered


def _as_text_turn(message: dict[str, Any], fmt: ToolFormat) -> dict[str, Any]:
    if message["role"] == "tool":
        return {
            "role": "user",
            "content": f"<tool_response>\n{message['content']}\n</tool_response>",
        }
    calls = message.get("tool_calls")
    if message["role"] != "assistant" or not calls:
        return message
    text = fmt.render_calls(
        [(call["function"]["name"], json.dumps(call["function"]["arguments"])) for call in calls]
    )
    content = message.get("content") or ""
    return {"role": "assistant", "content": f"{content}\n{text}" if content else text}
