"""A Responses output, built delta by delta: the typed stream events and the final response.

One builder serves both answers: a stream sends the events as they come, a whole response feeds
the collected deltas and keeps only the final object, so the two always agree. Text becomes a
`message` item with one `output_text` part; each tool call (parsed by the chat path's
ToolCallAssembler) a `function_call` item. An item closes when the next one opens or the output
ends; a reply cut by max_output_tokens leaves its last item and the response `incomplete`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from winnow.engine.outputs import FinishReason, PositionLogprobs, RequestOutput
from winnow.server.chat import chat_logprobs
from winnow.server.generation import usage
from winnow.server.responses_input import new_item_id
from winnow.server.responses_protocol import (
    IncompleteDetails,
    InputTokensDetails,
    OutputFunctionCall,
    OutputLogprob,
    OutputMessage,
    OutputText,
    OutputTokenLogprob,
    ResponseErrorInfo,
    ResponseObject,
    ResponseUsage,
)
from winnow.server.tool_calls import ToolCallAssembler, ToolPlan
from winnow.structured.tool_parser import CallArguments, CallOpened, ContentText

Event = dict[str, Any]


@dataclass
class _OpenMessage:
    id: str
    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[OutputTokenLogprob] = field(default_factory=list)


@dataclass
class _OpenCall:
    index: int
    item: OutputFunctionCall


class ResponseBuilder:
    """`shell`: the response as created (status in_progress, no output); `tools`: the chat
    path's plan (a parsing plan turns calls into function_call items)."""

    def __init__(self, shell: ResponseObject, tools: ToolPlan, logprobs: bool) -> None:
        self.response = shell
        self._assembler = ToolCallAssembler(tools) if tools.parse else None
        self._logprobs = logprobs
        self._sequence = 0
        self._open: _OpenMessage | _OpenCall | None = None

    def opening(self) -> list[Event]:
        return [
            self._event("response.created", response=self._dump()),
            self._event("response.in_progress", response=self._dump()),
        ]

    def feed(
        self,
        text: str,
        token_ids: list[int],
        logprobs: list[PositionLogprobs],
        finish_reason: FinishReason | None,
    ) -> list[Event]:
        """The events of one delta of the (only) choice."""
        finished = finish_reason is not None
        events: list[Event] = []
        pieces = self._logprob_items(logprobs)
        if self._assembler is None:
            if text or pieces:
                events += self._text(text, pieces)
        else:
            for event in self._assembler.feed(text, token_ids, finished=finished):
                if isinstance(event, ContentText):
                    events += self._text(event.text, pieces)
                    pieces = []
                elif isinstance(event, CallOpened):
                    events += self._close("completed")
                    item = OutputFunctionCall(
                        id=new_item_id("fc"),
                        status="in_progress",
                        call_id=event.id,
                        name=event.name,
                        arguments="",
                    )
                    self._open = _OpenCall(len(self.response.output), item)
                    self.response.output.append(item)
                    events.append(self._item_event("response.output_item.added", item))
                else:
                    events += self._arguments(event)
            if pieces and isinstance(self._open, _OpenMessage):
                self._open.logprobs += pieces
        if finished:
            if not self.response.output:
                events += self._text("", [])
            events += self._close("incomplete" if finish_reason == "length" else "completed")
        return events

    def closing(self, final: RequestOutput, finish_reason: FinishReason) -> list[Event]:
        """The closing event; `response` is then the whole, final response."""
        response = self.response
        counts = usage(final)
        response.usage = ResponseUsage(
            input_tokens=counts.prompt_tokens,
            input_tokens_details=InputTokensDetails(
                cached_tokens=counts.prompt_tokens_details.cached_tokens
            ),
            output_tokens=counts.completion_tokens,
            total_tokens=counts.total_tokens,
        )
        if finish_reason == "length":
            response.status = "incomplete"
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
            return [self._event("response.incomplete", response=self._dump())]
        response.status = "completed"
        return [self._event("response.completed", response=self._dump())]

    def failed(self, message: str) -> list[Event]:
        self.response.status = "failed"
        self.response.error = ResponseErrorInfo(code="server_error", message=message)
        return [self._event("response.failed", response=self._dump())]

    # -- items

    def _text(self, text: str, pieces: list[OutputTokenLogprob]) -> list[Event]:
        events: list[Event] = []
        if not isinstance(self._open, _OpenMessage):
            events += self._close("completed")
            message = _OpenMessage(new_item_id("msg"), len(self.response.output))
            self._open = message
            item = OutputMessage(id=message.id, status="in_progress", content=[])
            self.response.output.append(item)
            events.append(self._item_event("response.output_item.added", item))
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=message.id,
                    output_index=message.index,
                    content_index=0,
                    part=OutputText(text="").model_dump(),
                )
            )
        message = self._open
        assert isinstance(message, _OpenMessage)
        message.text.append(text)
        message.logprobs += pieces
        if text or pieces:
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=message.id,
                    output_index=message.index,
                    content_index=0,
                    delta=text,
                    logprobs=[piece.model_dump() for piece in pieces],
                )
            )
        return events

    def _arguments(self, event: CallArguments) -> list[Event]:
        call = self._open
        assert isinstance(call, _OpenCall)
        call.item.arguments += event.fragment
        return [
            self._event(
                "response.function_call_arguments.delta",
                item_id=call.item.id,
                output_index=call.index,
                delta=event.fragment,
            )
        ]

    def _close(self, status: str) -> list[Event]:
        opened, self._open = self._open, None
        if opened is None:
            return []
        if isinstance(opened, _OpenCall):
            item = opened.item
            item.status = status  # type: ignore[assignment]
            return [
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=opened.index,
                    name=item.name,
                    arguments=item.arguments,
                ),
                self._item_event("response.output_item.done", item, opened.index),
            ]
        part = OutputText(text="".join(opened.text), logprobs=opened.logprobs)
        message = OutputMessage(id=opened.id, status=status, content=[part])  # type: ignore[arg-type]
        self.response.output[opened.index] = message
        common = {"item_id": opened.id, "output_index": opened.index, "content_index": 0}
        logprobs = [piece.model_dump() for piece in opened.logprobs]
        return [
            self._event("response.output_text.done", **common, text=part.text, logprobs=logprobs),
            self._event("response.content_part.done", **common, part=part.model_dump()),
            self._item_event("response.output_item.done", message, opened.index),
        ]

    def _logprob_items(self, positions: list[PositionLogprobs]) -> list[OutputTokenLogprob]:
        if not self._logprobs or not positions:
            return []
        return [
            OutputTokenLogprob(
                token=entry.token,
                logprob=entry.logprob,
                bytes=entry.bytes,
                top_logprobs=[
                    OutputLogprob(token=top.token, logprob=top.logprob, bytes=top.bytes)
                    for top in entry.top_logprobs
                ],
            )
            for entry in chat_logprobs(positions).content
        ]

    # -- events

    def _item_event(self, kind: str, item: Any, index: int | None = None) -> Event:
        position = len(self.response.output) - 1 if index is None else index
        return self._event(kind, output_index=position, item=item.model_dump())

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _dump(self) -> dict[str, Any]:
        return self.response.model_dump(mode="json")
