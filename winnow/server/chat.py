"""POST /v1/chat/completions: messages -> engine -> one chat.completion or a chunk stream."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from fastapi import Request, Response

from winnow.engine.outputs import PositionLogprobs, RequestOutput
from winnow.server.context import SYSTEM_FINGERPRINT, ServerContext, engine_request_id, request_id
from winnow.server.errors import ApiError, client_errors
from winnow.server.generation import (
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
    ChoiceLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from winnow.server.streaming import sse_body, sse_response, usage_chunk_wanted
from winnow.server.tokenizer_pool import with_tokenizer


def check_supported(request: ChatCompletionRequest) -> None:
    """Cross-field rules and features that are valid OpenAI but not served (yet)."""
    if request.response_format is not None and request.response_format.type != "text":
        raise ApiError(
            400,
            f"response_format '{request.response_format.type}' is not supported yet",
            param="response_format",
        )
    choice = request.tool_choice
    if choice is None or choice in ("none", "auto"):
        return
    if not isinstance(choice, str):
        names = {tool.function.name for tool in request.tools or ()}
        if choice.function.name not in names:
            raise ApiError(
                400,
                f"tool_choice names function '{choice.function.name}', which is not in tools",
                param="tool_choice",
            )
    raise ApiError(
        400, "tool_choice 'required' or a named function is not supported yet", param="tool_choice"
    )


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, ctx: ServerContext
) -> Response:
    check_supported(body)
    include_usage = usage_chunk_wanted(body)
    model = ctx.resolve_model(body.model)
    max_tokens: int | None = body.max_tokens
    renames: dict[str, str] = {}
    if body.max_completion_tokens is not None:
        max_tokens, renames = body.max_completion_tokens, {"max_tokens": "max_completion_tokens"}
    with client_errors(renames):
        params = sampling_params(
            body,
            max_tokens=max_tokens,
            logprobs=bool(body.logprobs),
            top_logprobs=body.top_logprobs or 0,
        )
    prompt = await with_tokenizer(
        ctx.engine.tokenizer,
        partial(
            chat_prompt,
            messages=body.messages,
            system_prompt=body.system_prompt,
            tools=None if body.tool_choice == "none" else body.tools,
            template_kwargs=body.chat_template_kwargs,
            special_tokens_in_content=ctx.config.allow_special_tokens_in_content,
        ),
    )
    public_id = f"chatcmpl-{request_id(request)}"
    with client_errors(renames):
        generation = Generation(
            ctx.engine, engine_request_id(public_id), prompt, params, metrics=ctx.metrics
        )
    meta = ResponseMeta.of(public_id, model, body.seed)
    if body.stream:
        builder = ChatChunkBuilder(meta, include_usage)
        return sse_response(generation, sse_body(generation, builder, ctx.keepalive_s))
    result = await collect(generation, request, params.n)
    completion = chat_completion(meta, result, params.logprobs)
    return Response(completion.model_dump_json(), media_type="application/json")


def chat_completion(meta: ResponseMeta, result: GenerationResult, logprobs: bool) -> ChatCompletion:
    return ChatCompletion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        system_fingerprint=SYSTEM_FINGERPRINT,
        choices=[
            ChatChoice(
                index=choice.index,
                message=AssistantMessage(content=choice.text),
                logprobs=chat_logprobs(choice.logprobs) if logprobs else None,
                finish_reason=choice.final_reason,
                stop_reason=choice.stop_reason,
            )
            for choice in result.choices
        ],
        usage=usage(result.final),
        seed=meta.seed(result.final),
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
    """Per choice: a role chunk first, then content chunks, then `delta: {}` with the
    finish_reason; after every choice finished, the usage chunk if asked for."""

    def __init__(self, meta: ResponseMeta, include_usage: bool) -> None:
        self._meta = meta
        self._include_usage = include_usage
        self._started: set[int] = set()

    def chunks(self, output: RequestOutput) -> Iterator[ChatCompletionChunk]:
        for delta in output.choices:
            if delta.index not in self._started:
                self._started.add(delta.index)
                role = ChatDelta(role="assistant", content="")
                yield self._chunk(output, [ChatChunkChoice(index=delta.index, delta=role)])
            if delta.text or delta.logprobs:
                content = ChatChunkChoice(
                    index=delta.index,
                    delta=ChatDelta(content=delta.text),
                    logprobs=chat_logprobs(delta.logprobs) if delta.logprobs else None,
                )
                yield self._chunk(output, [content])
            if delta.finish_reason is not None:
                finish = ChatChunkChoice(
                    index=delta.index,
                    delta=ChatDelta(),
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                )
                yield self._chunk(output, [finish])

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
