"""Tools in a chat request: which tool_choice applies, the grammar that forces calls, and the
OpenAI objects (message.tool_calls, delta.tool_calls) built from a choice's parsed output.

tool_choice semantics (OpenAI's, as vLLM serves them): absent means "auto" when tools are given,
else "none"; "none" renders the tools into the prompt but parses nothing; "auto" parses the
model's own format, and when any tool is `strict` a grammar lets the model write text or start a
call, which it then holds to one of the tools with schema-valid arguments; "required" and a named
function force calls with a grammar (a named function: exactly one call to it);
`parallel_tool_calls: false` allows one call.
"""

from __future__ import annotations

from dataclasses import dataclass

from winnow.engine.outputs import FinishReason
from winnow.server.errors import ApiError
from winnow.server.protocol import (
    AssistantMessage,
    CalledFunction,
    CalledTool,
    ChatCompletionRequest,
    ChatDelta,
    ChatFinishReason,
    FunctionDelta,
    Tool,
    ToolCallDelta,
)
from winnow.structured.spec import GrammarSpec
from winnow.structured.tool_formats import FunctionSpec, ToolFormat
from winnow.structured.tool_grammar import auto_call_grammar, forced_call_grammar
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

    def assembler(self) -> ToolCallAssembler | None:
        return ToolCallAssembler(self) if self.parse else None


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
        if not any(tool.function.strict for tool in tools):
            return ToolPlan(fmt, parse=True, max_calls=max_calls)
        grammar = auto_call_grammar(fmt, _functions(tools), parallel=max_calls is None)
        return ToolPlan(fmt, parse=True, max_calls=max_calls, grammar=grammar)
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
    grammar = forced_call_grammar(fmt, _functions(chosen), parallel=max_calls is None)
    return ToolPlan(fmt, parse=True, max_calls=max_calls, grammar=grammar)


def _functions(tools: list[Tool]) -> list[FunctionSpec]:
    return [FunctionSpec(tool.function.name, tool.function.parameters) for tool in tools]


def message_content(text: str, has_calls: bool) -> str | None:
    """OpenAI's rule for an assistant message's `content`: null when the message carries tool
    calls and no text, else the text ("" for an empty reply)."""
    return None if has_calls and not text else text


class ToolCallAssembler:
    """One choice's tool calls, parsed from its deltas as they arrive (the model's own format,
    or a forced call), for both responses: a stream sends each event as a chunk delta
    (`event_delta`), a whole response is the message they add up to (`message`). Both follow
    `message_content`: a stream's first delta has `content: null` when the reply opens with a
    call (the message then carries a call and no text), else `""`."""

    def __init__(self, plan: ToolPlan) -> None:
        self._parser = ToolCallParser(plan.fmt, plan.max_calls)
        self._text: list[str] = []
        self._calls: list[CalledTool] = []

    def feed(self, text: str, token_ids: list[int], *, finished: bool) -> list[ToolEvent]:
        """The events of one delta of the choice (`finished`: its last)."""
        events = self._parser.feed(text, token_ids)
        if finished:
            events.extend(self._parser.finish())
        for event in events:
            if isinstance(event, ContentText):
                self._text.append(event.text)
            elif isinstance(event, CallOpened):
                function = CalledFunction(name=event.name, arguments="")
                self._calls.append(CalledTool(id=event.id, function=function))
            else:
                self._calls[event.index].function.arguments += event.fragment
        return events

    @staticmethod
    def opening_content(events: list[ToolEvent]) -> str | None:
        """A stream's first delta, sent before these (the choice's first) events."""
        return message_content("", has_calls=bool(events) and isinstance(events[0], CallOpened))

    def message(self) -> AssistantMessage:
        """The whole reply, once every delta has been fed."""
        text = "".join(self._text)
        return AssistantMessage(
            content=message_content(text, bool(self._calls)), tool_calls=self._calls or None
        )

    def finish_reason(self, reason: FinishReason) -> ChatFinishReason:
        """A reply that ended naturally after calling tools ends with "tool_calls"."""
        return "tool_calls" if reason == "stop" and self._calls else reason


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
