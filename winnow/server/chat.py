"""POST /v1/chat/completions: messages -> engine -> one chat.completion or a chunk stream."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

from fastapi import Request, Response

from winnow.engine.outputs import ChoiceDelta, PositionLogprobs, RequestOutput
from winnow.sampling.params import SamplingParams
from winnow.server.context import SYSTEM_FINGERPRINT, ServerContext, engine_request_id, request_id
from winnow.server.errors import client_errors
from winnow.server.generation import (
    ChoiceResult,
    Generation,
    GenerationResult,
    ResponseMeta,
    collect,
    finite_logprob,
    usage,
)
from winnow.server.params import sampling_params
from winnow.server.prompts import chat_prompt
from winnow.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatFinishReason,
    ChoiceLogprobs,
    OpeningDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from winnow.server.response_format import grammar_spec, prepare_grammar
from winnow.server.streaming import sse_body, sse_response, usage_chunk_wanted
from winnow.server.tokenizer_pool import with_tokenizer
from winnow.server.tool_calls import ToolCallAssembler, ToolPlan, event_delta, plan_tools


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, ctx: ServerContext
) -> Response:
    include_usage = usage_chunk_wanted(body)
    max_tokens: int | None = body.max_tokens
    renames: dict[str, str] = {}
    if body.max_completion_tokens is not None:
        max_tokens, renames = body.max_completion_tokens, {"max_tokens": "max_completion_tokens"}
    chat = await prepare_chat(
        body,
        ctx,
        f"chatcmpl-{request_id(request)}",
        max_tokens=max_tokens,
        renames=renames,
        size=len(await request.body()),
    )
    if body.stream:
        builder = ChatChunkBuilder(chat.meta, include_usage, chat.tools)
        return sse_response(chat.generation, sse_body(chat.generation, builder, ctx.keepalive_s))
    result = await collect(chat.generation, request, chat.params.n)
    completion = chat_completion(chat.meta, result, chat.params.logprobs, chat.tools)
    return Response(completion.model_dump_json(), media_type="application/json")


@dataclass(frozen=True)
class PreparedChat:
    """A chat request admitted to the engine: what either wire format answers from."""

    generation: Generation
    params: SamplingParams
    tools: ToolPlan
    meta: ResponseMeta


async def prepare_chat(
    body: ChatCompletionRequest,
    ctx: ServerContext,
    public_id: str,
    *,
    max_tokens: int | None,
    renames: dict[str, str],
    size: int,
) -> PreparedChat:
    """Template, tools, grammar and sampling of a chat request, submitted to the engine; the
    one path under both /v1/chat/completions and /v1/responses. `renames` maps engine-side
    parameter names to the request's own (see engine_error); `size`: the request body's bytes
    (see with_tokenizer)."""
    tools = plan_tools(body, ctx.tool_format, auto_enabled=ctx.config.enable_auto_tool_choice)
    model = ctx.resolve_model(body.model)
    with client_errors(renames):
        params = sampling_params(
            body,
            max_tokens=max_tokens,
            logprobs=body.logprobs,
            top_logprobs=body.top_logprobs,
            defaults=ctx.engine.sampling_defaults,
        )
    prompt = await with_tokenizer(
        ctx.engine.tokenizer,
        partial(
            chat_prompt,
            messages=body.messages,
            tool_format=ctx.tool_format,
            system_prompt=body.system_prompt,
            tools=body.tools,
            template_kwargs=body.chat_template_kwargs,
            special_tokens_in_content=ctx.config.allow_special_tokens_in_content,
            max_model_len=ctx.engine.max_model_len,
        ),
        size=size,
    )
    # a tool grammar (forced calls, or strict tools under "auto") wins over response_format
    tool_grammar = tools.grammar
    if tool_grammar is not None:
        grammar = await prepare_grammar(ctx.engine, lambda: tool_grammar, param="tools")
    else:
        param = renames.get("response_format", "response_format")
        build = partial(grammar_spec, body.response_format, param)
        grammar = await prepare_grammar(ctx.engine, build, param)
    with client_errors(renames):
        generation = Generation(
            ctx.engine,
            engine_request_id(public_id),
            prompt,
            params,
            metrics=ctx.metrics,
            grammar=grammar,
        )
    return PreparedChat(generation, params, tools, ResponseMeta.of(public_id, model, body.seed))


def chat_completion(
    meta: ResponseMeta, result: GenerationResult, logprobs: bool, tools: ToolPlan
) -> ChatCompletion:
    return ChatCompletion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        system_fingerprint=SYSTEM_FINGERPRINT,
        choices=[
            chat_choice(choice, chat_logprobs(choice.logprobs) if logprobs else None, tools)
            for choice in result.choices
        ],
        usage=usage(result.final),
        seed=meta.seed(result.final),
    )


def chat_choice(
    choice: ChoiceResult, logprobs: ChoiceLogprobs | None, tools: ToolPlan
) -> ChatChoice:
    assembler = tools.assembler()
    if assembler is None:
        message = AssistantMessage(content=choice.text)
        reason: ChatFinishReason = choice.final_reason
    else:
        parts = list(zip(choice.text_parts, choice.token_id_parts, strict=True))
        for position, (text, token_ids) in enumerate(parts):
            assembler.feed(text, token_ids, finished=position == len(parts) - 1)
        message = assembler.message()
        reason = assembler.finish_reason(choice.final_reason)
    return ChatChoice(
        index=choice.index,
        message=message,
        logprobs=logprobs,
        finish_reason=reason,
        stop_reason=choice.stop_reason,
    )


def chat_logprobs(positions: list[PositionLogprobs]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=position.sampled.token,
                logprob=finite_logprob(position.sampled.logprob),
                bytes=position.sampled.bytes,
                top_logprobs=[
                    TopLogprob(
                        token=top.token, logprob=finite_logprob(top.logprob), bytes=top.bytes
                    )
                    for top in position.top
                ],
            )
            for position in positions
        ]
    )


class ChatChunkBuilder:
    """Per choice: a role chunk first, then content (or tool-call) chunks, then `delta: {}` with
    the finish_reason; after every choice finished, the usage chunk if asked for."""

    def __init__(
        self, meta: ResponseMeta, include_usage: bool, tools: ToolPlan | None = None
    ) -> None:
        self._meta = meta
        self._include_usage = include_usage
        self._tools = tools
        self._started: set[int] = set()
        self._assemblers: dict[int, ToolCallAssembler] = {}
        self._held_logprobs: dict[int, list[PositionLogprobs]] = {}

    def chunks(self, output: RequestOutput) -> Iterator[ChatCompletionChunk]:
        for delta in output.choices:
            parse = self._tools is not None and self._tools.parse
            for choice in self._tool_choices(delta) if parse else self._text_choices(delta):
                yield self._chunk(output, [choice])

    def _text_choices(self, delta: ChoiceDelta) -> Iterator[ChatChunkChoice]:
        if delta.index not in self._started:
            self._started.add(delta.index)
            yield ChatChunkChoice(index=delta.index, delta=OpeningDelta(content=""))
        if delta.text or delta.logprobs:
            yield ChatChunkChoice(
                index=delta.index,
                delta=ChatDelta(content=delta.text),
                logprobs=chat_logprobs(delta.logprobs) if delta.logprobs else None,
            )
        if delta.finish_reason is not None:
            yield ChatChunkChoice(
                index=delta.index,
                delta=ChatDelta(),
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason,
            )

    def _tool_choices(self, delta: ChoiceDelta) -> Iterator[ChatChunkChoice]:
        """Chunks from the choice's assembler; the role chunk waits for the first event (see
        ToolCallAssembler.opening_content); logprobs ride on the next chunk."""
        index = delta.index
        assembler = self._assemblers.get(index)
        if assembler is None:
            assert self._tools is not None
            assembler = self._assemblers[index] = ToolCallAssembler(self._tools)
        held = self._held_logprobs.setdefault(index, [])
        held.extend(delta.logprobs or ())
        finished = delta.finish_reason is not None
        events = assembler.feed(delta.text, delta.token_ids, finished=finished)
        if index not in self._started and (events or finished):
            self._started.add(index)
            content = assembler.opening_content(events)
            yield ChatChunkChoice(index=index, delta=OpeningDelta(content=content))
        for event in events:
            yield ChatChunkChoice(index=index, delta=event_delta(event), logprobs=self._take(index))
        if delta.finish_reason is not None:
            yield ChatChunkChoice(
                index=index,
                delta=ChatDelta(),
                logprobs=self._take(index),
                finish_reason=assembler.finish_reason(delta.finish_reason),
                stop_reason=delta.stop_reason,
            )

    def _take(self, index: int) -> ChoiceLogprobs | None:
        held = self._held_logprobs.get(index)
        if not held:
            return None
        self._held_logprobs[index] = []
        return chat_logprobs(held)

    def closing_chunks(self, final: RequestOutput) -> Iterator[ChatCompletionChunk]:
        if self._include_usage:
            yield self._chunk(final, [], usage(final))

    def _chunk(
        self, output: RequestOutput, choices: list[ChatChunkChoice], totals: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self._meta.id,
            created=self._meta.created,
            model=self._meta.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=choices,
            usage=totals,
            seed=self._meta.seed(output),
        )
