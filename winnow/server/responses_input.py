"""A Responses request -> the chat request underneath it: conversation items become chat
messages, flat function tools become chat tools, `text.format` becomes `response_format`.

Items are kept (and stored) in the shape `GET /v1/responses/{id}/input_items` answers: each
with an id and a status, message text as `input_text` / `output_text` parts. Every problem is a
400 naming the request field (`input[2].call_id`, `tools[0]`, `text.format`).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic import ValidationError

from winnow.server.errors import ApiError, loc_to_param
from winnow.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    GenerationFields,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
)
from winnow.server.responses_protocol import (
    LOGPROBS_INCLUDE,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    InputContentPart,
    MessageItem,
    ResponsesRequest,
    parse_input_item,
)

_TEXT_PARTS = ("input_text", "output_text", "text")


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's `input` as stored items (a string is one user message)."""
    if isinstance(body.input, str):
        raw: list[Any] = [{"type": "message", "role": "user", "content": body.input}]
    else:
        raw = body.input
    items = []
    for position, entry in enumerate(raw):
        param = f"input[{position}]"
        item = _validated(parse_input_item, entry, param)
        items.append(_stored(item, param))
    return items


def _stored(
    item: MessageItem | FunctionCallItem | FunctionCallOutputItem, param: str
) -> dict[str, Any]:
    if isinstance(item, MessageItem):
        kind = "output_text" if item.role == "assistant" else "input_text"
        stored: dict[str, Any] = {
            "id": item.id or new_item_id("msg"),
            "type": "message",
            "role": item.role,
            "status": "completed",
            "content": [
                _text_part(kind, part, f"{param}.content") for part in _parts(item.content)
            ],
        }
        return stored
    if isinstance(item, FunctionCallItem):
        return {
            "id": item.id or new_item_id("fc"),
            "type": "function_call",
            "status": "completed",
            "call_id": item.call_id,
            "name": item.name,
            "arguments": item.arguments,
        }
    output = item.output
    if not isinstance(output, str):
        output = "".join(_part_text(part, f"{param}.output") for part in output)
    return {
        "id": item.id or new_item_id("fco"),
        "type": "function_call_output",
        "status": "completed",
        "call_id": item.call_id,
        "output": output,
    }


def _parts(content: str | list[InputContentPart]) -> list[InputContentPart]:
    if isinstance(content, str):
        return [InputContentPart(type="input_text", text=content)]
    return content


def _part_text(part: InputContentPart, param: str) -> str:
    if part.type not in _TEXT_PARTS or part.text is None:
        message = f"content part type '{part.type}' is not supported by this model"
        raise ApiError(400, message, param=param)
    return part.text


def _text_part(kind: str, part: InputContentPart, param: str) -> dict[str, Any]:
    text = _part_text(part, param)
    if kind == "output_text":
        return {"type": "output_text", "text": text, "annotations": []}
    return {"type": "input_text", "text": text}


def chat_messages(items: list[dict[str, Any]], new_from: int) -> list[ChatMessage]:
    """The conversation as chat messages; items from `new_from` on are the request's own (the
    ones a 400 names). A function_call_output must answer a call made earlier in it."""
    messages: list[ChatMessage] = []
    calls: set[str] = set()
    for position, item in enumerate(items):
        param = f"input[{position - new_from}]"
        if item["type"] == "message":
            text = "\n".join(part["text"] for part in item["content"])
            messages.append(ChatMessage(role=item["role"], content=text))
        elif item["type"] == "function_call":
            call = ToolCall(
                id=item["call_id"],
                type="function",
                function=FunctionCall(name=item["name"], arguments=item["arguments"]),
            )
            _check_arguments(item["arguments"], f"{param}.arguments")
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls is not None:
                last.tool_calls.append(call)
            elif last is not None and last.role == "assistant":
                messages[-1] = ChatMessage(
                    role="assistant", content=last.content, tool_calls=[call]
                )
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
            calls.add(item["call_id"])
        else:
            if item["call_id"] not in calls:
                raise ApiError(
                    400,
                    f"No function call with call_id '{item['call_id']}' precedes this output "
                    "in the conversation.",
                    param=f"{param}.call_id",
                )
            messages.append(
                ChatMessage(role="tool", content=item["output"], tool_call_id=item["call_id"])
            )
    if not messages:
        raise ApiError(400, "input holds no message", param="input")
    return messages


def _check_arguments(arguments: str, param: str) -> None:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ApiError(400, "function call arguments must be a JSON object", param=param)


def chat_tools(body: ResponsesRequest) -> list[Tool] | None:
    if body.tools is None:
        return None
    tools = []
    for position, raw in enumerate(body.tools):
        param = f"tools[{position}]"
        kind = raw.get("type")
        if kind != "function":
            raise ApiError(400, f"tool type '{kind}' is not supported", param=f"{param}.type")
        tool = _validated(FunctionTool.model_validate, raw, param)
        definition = _validated(
            FunctionDefinition.model_validate,
            tool.model_dump(include={"name", "description", "parameters", "strict"}),
            param,
        )
        tools.append(Tool(type="function", function=definition))
    if len({tool.function.name for tool in tools}) != len(tools):
        raise ApiError(400, "function names in tools must be unique", param="tools")
    return tools


def chat_request(
    body: ResponsesRequest, items: list[dict[str, Any]], new_from: int
) -> ChatCompletionRequest:
    """The chat request the Responses request means, over the whole conversation."""
    choice: str | NamedToolChoice | None = None
    if isinstance(body.tool_choice, str):
        choice = body.tool_choice
    elif body.tool_choice is not None:
        named = NamedFunction(name=body.tool_choice.name)
        choice = NamedToolChoice(type="function", function=named)
    text_format = body.text.format if body.text is not None else None
    response_format = None
    if text_format is not None:
        schema = text_format.json_schema() if text_format.type == "json_schema" else None
        response_format = ResponseFormat.model_construct(type=text_format.type, json_schema=schema)
    shared = {name: getattr(body, name) for name in GenerationFields.model_fields}
    shared.update(stream=None, stream_options=None, n=None)
    return ChatCompletionRequest.model_construct(
        **shared,
        messages=chat_messages(items, new_from),
        max_completion_tokens=body.max_output_tokens,
        logprobs=LOGPROBS_INCLUDE in (body.include or ()) or None,
        top_logprobs=body.top_logprobs,
        tools=chat_tools(body),
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=response_format,
        chat_template_kwargs=body.chat_template_kwargs,
        system_prompt=body.instructions,
    )


def _validated(parse: Any, raw: Any, param: str) -> Any:
    """`parse(raw)`, a validation error becoming a 400 that names the field under `param`."""
    try:
        return parse(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        inner = loc_to_param(
            [str(part) if not isinstance(part, int) else part for part in first["loc"]]
        )
        where = f"{param}.{inner}" if inner and not inner.startswith("[") else param + (inner or "")
        raise ApiError(400, f"Invalid '{where}': {first['msg']}.", param=where) from None
    except ValueError as exc:  # a PydanticCustomError raised outside a model
        raise ApiError(400, f"Invalid '{param}': {exc}.", param=param) from None
