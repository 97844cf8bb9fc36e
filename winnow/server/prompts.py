"""Prompt token ids from a request: chat messages through the model's chat template, or text."""

from __future__ import annotations

import json
from typing import Any

from winnow.models import ChatTemplateError, Tokenizer
from winnow.server.errors import ApiError
from winnow.server.protocol import ChatMessage, Tool, ToolCall
from winnow.structured.tool_formats import ToolFormat
from winnow.structured.tool_prompt import template_reads_tools, with_tools_in_prompt

# Arguments of transformers' apply_chat_template: a request may not set them through
# chat_template_kwargs (a template from the request, tokenize=True, ...).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "add_generation_prompt",
        "chat_template",
        "continue_final_message",
        "conversation",
        "documents",
        "max_length",
        "messages",
        "padding",
        "return_assistant_tokens_mask",
        "return_dict",
        "return_tensors",
        "tokenize",
        "tokenizer_kwargs",
        "tools",
        "truncation",
    }
)


def template_messages(
    messages: list[ChatMessage], system_prompt: str | None
) -> list[dict[str, Any]]:
    """OpenAI messages as the chat template reads them: `developer` becomes `system`, content is
    one string, and `system_prompt` leads (merged into a leading system message if there is one).
    """
    rendered = [_template_message(message, i) for i, message in enumerate(messages)]
    if system_prompt is not None:
        if rendered[0]["role"] == "system":
            rendered[0]["content"] = f"{system_prompt}\n\n{rendered[0]['content']}"
        else:
            rendered.insert(0, {"role": "system", "content": system_prompt})
    return rendered


def _template_message(message: ChatMessage, position: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        "content": message.text,
    }
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        # templates concatenate content as a string, so a call-only turn's null becomes ""
        out["content"] = out["content"] or ""
        out["tool_calls"] = [
            _template_call(call, f"messages[{position}].tool_calls[{j}].function.arguments")
            for j, call in enumerate(message.tool_calls)
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _template_call(call: ToolCall, param: str) -> dict[str, Any]:
    """A call as templates read it: arguments as a dict (as vLLM hands them over)."""
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ApiError(400, "tool call arguments must be a JSON object", param=param)
    return {
        "id": call.id,
        "type": call.type,
        "function": {"name": call.function.name, "arguments": arguments},
    }


def template_inputs(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    tool_format: ToolFormat,
    system_prompt: str | None = None,
    tools: list[Tool] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools the chat template gets. A template that knows no tools gets
    them (and earlier tool turns) written into the messages as text instead."""
    tool_dicts = [tool.model_dump(exclude_none=True) for tool in tools] if tools else None
    rendered = template_messages(messages, system_prompt)
    if not template_reads_tools(tokenizer.chat_template):
        return with_tools_in_prompt(rendered, tool_dicts, tool_format), None
    return rendered, tool_dicts


def chat_prompt(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    *,
    tool_format: ToolFormat,
    system_prompt: str | None = None,
    tools: list[Tool] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    special_tokens_in_content: bool = False,
    max_model_len: int | None = None,
) -> list[int]:
    """Render the chat template; a template that rejects the conversation is the client's 400.

    Control-token text in the messages is encoded as text unless `special_tokens_in_content`.
    `max_model_len`: refuse messages that cannot fit it without rendering them.
    """
    chars = sum(len(message.text or "") for message in messages)
    check_prompt_length(tokenizer, chars, max_model_len, "messages")
    for key in template_kwargs or ():
        if key in RESERVED_TEMPLATE_KWARGS or not key.isidentifier():
            raise ApiError(
                400, f"chat_template_kwargs may not set '{key}'", param="chat_template_kwargs"
            )
    rendered, tool_dicts = template_inputs(tokenizer, messages, tool_format, system_prompt, tools)
    try:
        return tokenizer.render_chat(
            rendered,
            tool_dicts,
            template_kwargs,
            special_tokens_in_content=special_tokens_in_content,
        )
    except ChatTemplateError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    except UnicodeError as exc:
        raise ApiError(
            400, "messages contain text that is not valid Unicode", param="messages"
        ) from exc


def check_prompt_length(
    tokenizer: Tokenizer, chars: int, max_model_len: int | None, param: str
) -> None:
    """Refuse, before encoding it, text that cannot fit `max_model_len` tokens even if each of
    its tokens were the vocabulary's longest: encoding a 4 MiB prompt holds a tokenizer thread
    for seconds only to find it too long."""
    if max_model_len is None:
        return
    cap = max_model_len * tokenizer.longest_token_chars
    if chars > cap:
        raise ApiError(
            400,
            f"The prompt is {chars} characters long, more than the {cap} that could fit this "
            f"model's context of {max_model_len} tokens.",
            param=param,
            code="context_length_exceeded",
        )


def text_prompt(
    tokenizer: Tokenizer,
    text: str,
    *,
    add_special_tokens: bool = True,
    max_model_len: int | None = None,
) -> list[int]:
    """`max_model_len`: refuse text that cannot fit it without encoding it."""
    check_prompt_length(tokenizer, len(text), max_model_len, "prompt")
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except UnicodeError as exc:
        raise ApiError(400, "prompt is not valid Unicode", param="prompt") from exc


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise ApiError(400, f"token id {token_id} is outside [0, {vocab_size})", param=param)
