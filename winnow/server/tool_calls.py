"""Tools in a chat request: which tool_choice applies, the grammar that forces calls, and the
OpenAI objects (message.tool_calls, delta.tool_calls) built from a choice's parsed output.

tool_choice semantics (OpenAI's, as vLLM serves them): absent means "auto" when tools are given,
else "none"; "none" renders the tools into the prompt but parses nothing; "auto" parses the
model's own format; "required" and a named function force calls with a grammar (a named function:
exactly one call to it); `parallel_tool_calls: false` allows one call.
"""

from __future__ import annotations

from dataclasses import dataclass

from winnow.engine.outputs import FinishReason
from winnow.server.errors import ApiError
from winnow.server.protocol import (
    CalledFunction,
    CalledTool,
    ChatCompletionRequest,
    ChatDelta,
    ChatFinishReason,
    FunctionDelta,
    ToolCallDelta,
)
from winnow.structured.backend import GrammarError
from winnow.structured.schema_limits import check_schema_depth
from winnow.structured.spec import GrammarSpec
from winnow.structured.tool_formats import FunctionSpec, ToolFormat
from winnow.structured.tool_grammar import forced_call_grammar
from winnow.structured.tool_parser import (
    CallArguments,
    CallOpened,
    ContentText,
    ToolCallParser,
    ToolEvent,
)


@dataclass(frozen=True)
class ToolPlan:
    """`parse`: output is scanned for calls; `grammar`: calls are forced."""

    fmt: ToolFormat
    parse: bool = False
    max_calls: int | None = None
    grammar: GrammarSpec | None = None

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.fmt, self.max_calls) if self.parse else None


def plan_tools(request: ChatCompletionRequest, fmt: ToolFormat, *, auto_enabled: bool) -> ToolPlan:
    tools = request.tools or []
    choice = request.tool_choice or ("auto" if tools else "none")
    if choice == "none" or (choice == "auto" and not tools):
        return ToolPlan(fmt)
    if not tools:
        name = choice if isinstance(choice, str) else "a named function"
        raise ApiError(
            400, f"tool_choice '{name}' needs a non-empty tools list", param="tool_choice"
        )
    max_calls = 1 if request.parallel_tool_calls is False else None
    if choice == "auto":
        if not auto_enabled:
            raise ApiError(
                400,
                'tool_choice "auto" needs the server started with --enable-auto-tool-choice',
                param="tool_choice",
            )
        return ToolPlan(fmt, parse=True, max_calls=max_calls)
    if isinstance(choice, str):  # "required"
        chosen = tools
    else:
        chosen = [tool for tool in tools if tool.function.name == choice.function.name]
        if not chosen:
            raise ApiError(
                400,
                f"tool_choice names function '{choice.function.name}', which is not in tools",
                param="tool_choice",
            )
        max_calls = 1
    for position, tool in enumerate(tools):
        if tool in chosen and tool.function.parameters is not None:
            try:
                check_schema_depth(tool.function.parameters)
            except GrammarError as exc:
                param = f"tools[{position}].function.parameters"
                raise ApiError(400, str(exc), param=param) from None
    functions = [FunctionSpec(tool.function.name, tool.function.parameters) for tool in chosen]
    grammar = forced_call_grammar(fmt, functions, parallel=max_calls is None)
    return ToolPlan(fmt, parse=True, max_calls=max_calls, grammar=grammar)


def finish_reason(reason: FinishReason, parser: ToolCallParser) -> ChatFinishReason:
    """A reply that ended naturally after calling tools ends with "tool_calls"."""
    return "tool_calls" if reason == "stop" and parser.calls else reason


@dataclass
class ParsedReply:
    content: str | None
    tool_calls: list[CalledTool] | None


def parse_reply(
    parser: ToolCallParser, text_parts: list[str], token_id_parts: list[list[int]]
) -> ParsedReply:
    """A whole choice, fed delta by delta as the stream would be; content is null when the
    reply is only calls."""
    events: list[ToolEvent] = []
    for text, token_ids in zip(text_parts, token_id_parts, strict=True):
        events.extend(parser.feed(text, token_ids))
    events.extend(parser.finish())
    content: list[str] = []
    calls: list[CalledTool] = []
    for event in events:
        if isinstance(event, ContentText):
            content.append(event.text)
        elif isinstance(event, CallOpened):
            calls.append(
                CalledTool(id=event.id, function=CalledFunction(name=event.name, arguments=""))
            )
        else:
            calls[event.index].function.arguments += event.fragment
    text = "".join(content)
    return ParsedReply(text or (None if calls else ""), calls or None)


def event_delta(event: ToolEvent) -> ChatDelta:
    """The chunk delta of one event: the call's id, type and name come once, then only
    argument pieces (the SDK concatenates strings, so a repeat would corrupt them)."""
    if isinstance(event, ContentText):
        return ChatDelta(content=event.text)
    if isinstance(event, CallOpened):
        opened = ToolCallDelta(
            index=event.index,
            id=event.id,
            type="function",
            function=FunctionDelta(name=event.name, arguments=""),
        )
        return ChatDelta(tool_calls=[opened])
    assert isinstance(event, CallArguments)
    piece = ToolCallDelta(index=event.index, function=FunctionDelta(arguments=event.fragment))
    return ChatDelta(tool_calls=[piece])
