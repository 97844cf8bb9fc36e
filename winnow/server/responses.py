"""POST /v1/responses and the stored responses: the Responses wire format over the chat path.

A request becomes the chat request it means (`responses_input`) and runs through
`prepare_chat` -- template, tools, grammar, sampling, engine -- exactly as a chat completion
does; only the answer's shape differs (`responses_output`). A continuation
(`previous_response_id`) is the stored conversation, then the previous output, then the new
input, so its rendered prompt extends the previous one and its prefix comes from the cache.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel

from winnow.engine.outputs import RequestOutput
from winnow.server.chat import prepare_chat
from winnow.server.context import ServerContext
from winnow.server.errors import ENGINE_ERRORS, ApiError, engine_error
from winnow.server.generation import Generation, collect
from winnow.server.response_store import AsyncResponseStore, StoredResponse
from winnow.server.responses_input import chat_request, input_items
from winnow.server.responses_output import Event, ResponseBuilder
from winnow.server.responses_protocol import (
    DeletedResponse,
    InputItemList,
    ResponseObject,
    ResponsesRequest,
)
from winnow.server.streaming import PING, sse_event, sse_response, with_keepalive

# Engine-side names of the fields a Responses request spells its own way.
_RENAMES = {
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "logprobs": "include",
}


async def create_response(
    body: ResponsesRequest, request: Request, ctx: ServerContext, store: AsyncResponseStore
) -> Response:
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        history = await _conversation(store, body.previous_response_id)
    items = history + input_items(body)
    chat = chat_request(body, items, len(history))
    response_id = f"resp_{uuid.uuid4().hex}"
    max_tokens = body.max_output_tokens if body.max_output_tokens is not None else body.max_tokens
    size = len(await request.body())
    prepared = await prepare_chat(
        chat, ctx, response_id, max_tokens=max_tokens, renames=_RENAMES, size=size
    )
    keep = body.store is not False and store.enabled
    shell = ResponseObject(
        id=response_id,
        created_at=prepared.meta.created,
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        model=prepared.meta.model,
        output=[],
        parallel_tool_calls=body.parallel_tool_calls is not False,
        previous_response_id=body.previous_response_id,
        temperature=prepared.params.temperature,
        top_p=prepared.params.top_p,
        tool_choice=_tool_choice(body),
        tools=[{**tool, "strict": tool.get("strict", False)} for tool in body.tools or []],
        text={"format": _text_format(body)},
        store=keep,
        metadata=body.metadata or {},
    )
    builder = ResponseBuilder(shell, prepared.tools, bool(chat.logprobs))
    saved = _Saver(store, items) if keep else None
    if body.stream:
        events = _event_stream(prepared.generation, builder, ctx.keepalive_s, saved)
        return sse_response(prepared.generation, events)
    result = await collect(prepared.generation, request, 1)
    choice = result.choices[0]
    for text, token_ids in zip(choice.text_parts, choice.token_id_parts, strict=True):
        builder.feed(text, token_ids, [], None)
    builder.feed("", [], choice.logprobs, choice.final_reason)
    builder.closing(result.final, choice.final_reason)
    if saved is not None:
        await saved.save(builder.response)
    return _json(builder.response)


class _Saver:
    def __init__(self, store: AsyncResponseStore, items: list[dict[str, Any]]) -> None:
        self._store = store
        self._items = items

    async def save(self, response: ResponseObject) -> None:
        record = StoredResponse(
            response.id, time.time(), response.model_dump_json(), json.dumps(self._items)
        )
        await self._store.put(record)


async def _event_stream(
    generation: Generation,
    builder: ResponseBuilder,
    keepalive_s: float,
    saved: _Saver | None,
) -> AsyncIterator[bytes]:
    """Every event of one streamed response; a failure after the 200 is `response.failed`."""
    try:
        for event in builder.opening():
            yield _sse(event)
        final: RequestOutput | None = None
        reason = None
        async for output in with_keepalive(generation.outputs(), keepalive_s):
            if output is None:
                yield PING
                continue
            final = output
            for delta in output.choices:
                reason = delta.finish_reason or reason
                events = builder.feed(
                    delta.text, delta.token_ids, delta.logprobs or [], delta.finish_reason
                )
                for event in events:
                    yield _sse(event)
        assert final is not None and reason is not None, "the engine ended without output"
        closing = builder.closing(final, reason)
        if saved is not None:
            await saved.save(builder.response)
        for event in closing:
            yield _sse(event)
    except Exception as exc:
        message = (
            engine_error(exc).message
            if isinstance(exc, ENGINE_ERRORS)
            else "The server had an error while streaming the response."
        )
        for event in builder.failed(message):
            yield _sse(event)
    finally:
        generation.close()


def _sse(event: Event) -> bytes:
    return f"event: {event['type']}\n".encode() + sse_event(event)


def _text_format(body: ResponsesRequest) -> dict[str, Any]:
    if body.text is None or body.text.format is None:
        return {"type": "text"}
    return body.text.format.echoed()


def _tool_choice(body: ResponsesRequest) -> Any:
    choice = body.tool_choice
    if choice is None:
        return "auto" if body.tools else "none"
    return choice if isinstance(choice, str) else choice.model_dump()


async def _conversation(store: AsyncResponseStore, response_id: str) -> list[dict[str, Any]]:
    """The items a continuation of `response_id` starts from: its input, then its output."""
    record = await store.get(response_id)
    if record is None:
        raise ApiError(
            404,
            f"Previous response with id '{response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    previous = json.loads(record.response)
    items: list[dict[str, Any]] = json.loads(record.items)
    return items + previous["output"]


async def retrieve_response(response_id: str, store: AsyncResponseStore) -> Response:
    record = await _record(store, response_id)
    return Response(record.response, media_type="application/json")


async def delete_response(response_id: str, store: AsyncResponseStore) -> Response:
    if not await store.delete(response_id):
        raise _not_found(response_id)
    return _json(DeletedResponse(id=response_id))


async def list_input_items(
    response_id: str, store: AsyncResponseStore, order: str, limit: int, after: str | None
) -> Response:
    """The conversation items the response was generated from, OpenAI's cursor page."""
    record = await _record(store, response_id)
    items: list[dict[str, Any]] = json.loads(record.items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page, more = items[:limit], len(items) > limit
    first = page[0]["id"] if page else None
    last = page[-1]["id"] if page else None
    return _json(InputItemList(data=page, first_id=first, last_id=last, has_more=more))


async def _record(store: AsyncResponseStore, response_id: str) -> StoredResponse:
    record = await store.get(response_id)
    if record is None:
        raise _not_found(response_id)
    return record


def _not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id '{response_id}' not found.", param="response_id")


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")
