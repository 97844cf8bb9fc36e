"""POST /v1/completions: the legacy text-completion API on the same engine and sampling fields."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from fastapi import Request, Response

from winnow.engine.outputs import PositionLogprobs, RequestOutput
from winnow.server.context import SYSTEM_FINGERPRINT, ServerContext, engine_request_id, request_id
from winnow.server.errors import ApiError, client_errors
from winnow.server.generation import Generation, ResponseMeta, collect, finite_logprob, usage
from winnow.server.params import sampling_params
from winnow.server.prompts import check_token_ids, text_prompt
from winnow.server.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
)
from winnow.server.response_format import grammar_spec, prepare_grammar
from winnow.server.streaming import sse_body, sse_response, usage_chunk_wanted

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint
# Engine-side names -> this endpoint's fields.
_RENAMES = {"top_logprobs": "logprobs", "messages": "prompt"}

if TYPE_CHECKING:
    from winnow.engine.async_engine import AsyncEngine


def check_supported(request: CompletionRequest) -> None:
    if request.echo:
        raise ApiError(400, "echo is not supported yet", param="echo")
    if request.suffix is not None:
        raise ApiError(400, "suffix is not supported by this model", param="suffix")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise ApiError(400, "best_of other than n is not supported", param="best_of")


def prompt_ids(
    engine: AsyncEngine, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[int]:
    """One prompt, given as text or as token ids (a one-element batch is accepted too)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return text_prompt(engine.tokenizer, prompt)
    token_ids = [token for token in prompt if isinstance(token, int)]
    if not token_ids or len(token_ids) != len(prompt):
        raise ApiError(400, "give exactly one prompt per request", param="prompt")
    check_token_ids(token_ids, engine.vocab_size, "prompt")
    return token_ids


async def create_completion(
    body: CompletionRequest, request: Request, ctx: ServerContext
) -> Response:
    check_supported(body)
    include_usage = usage_chunk_wanted(body)
    model = ctx.resolve_model(body.model)
    with client_errors(_RENAMES):
        params = sampling_params(
            body,
            max_tokens=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
            logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0,
        )
    prompt = prompt_ids(ctx.engine, body.prompt)
    grammar = await prepare_grammar(ctx.engine, grammar_spec(body.response_format))
    public_id = f"cmpl-{request_id(request)}"
    with client_errors(_RENAMES):
        generation = Generation(
            ctx.engine,
            engine_request_id(public_id),
            prompt,
            params,
            metrics=ctx.metrics,
            text_continues_prompt=True,
            grammar=grammar,
        )
    meta = ResponseMeta.of(public_id, model, body.seed)
    if body.stream:
        builder = CompletionChunkBuilder(meta, include_usage, params.logprobs)
        return sse_response(generation, sse_body(generation, builder, ctx.keepalive_s))
    result = await collect(generation, request, params.n)
    completion = Completion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        system_fingerprint=SYSTEM_FINGERPRINT,
        choices=[
            CompletionChoice(
                index=choice.index,
                text=choice.text,
                logprobs=legacy_logprobs(choice.logprobs, 0) if params.logprobs else None,
                finish_reason=choice.final_reason,
                stop_reason=choice.stop_reason,
            )
            for choice in result.choices
        ],
        usage=usage(result.final),
        seed=meta.seed(result.final),
    )
    return Response(completion.model_dump_json(), media_type="application/json")


def legacy_logprobs(positions: list[PositionLogprobs], offset: int) -> CompletionLogprobs:
    """The legacy layout: parallel lists; `text_offset` counts characters from `offset`."""
    offsets = []
    for position in positions:
        offsets.append(offset)
        offset += len(position.sampled.token)
    return CompletionLogprobs(
        tokens=[position.sampled.token for position in positions],
        token_logprobs=[finite_logprob(position.sampled.logprob) for position in positions],
        top_logprobs=[
            {top.token: finite_logprob(top.logprob) for top in position.top}
            for position in positions
        ]
        if any(position.top for position in positions)
        else None,
        text_offset=offsets,
    )


class CompletionChunkBuilder:
    """Text chunks per choice, then one chunk with empty text and the finish_reason; after every
    choice finished, the usage chunk if asked for."""

    def __init__(self, meta: ResponseMeta, include_usage: bool, logprobs: bool) -> None:
        self._meta = meta
        self._include_usage = include_usage
        self._logprobs = logprobs
        self._offsets: dict[int, int] = {}

    def chunks(self, output: RequestOutput) -> Iterator[Completion]:
        for delta in output.choices:
            if delta.text or delta.logprobs:
                logprobs = None
                if self._logprobs and delta.logprobs:
                    offset = self._offsets.get(delta.index, 0)
                    logprobs = legacy_logprobs(delta.logprobs, offset)
                    self._offsets[delta.index] = offset + sum(len(t) for t in logprobs.tokens)
                text = CompletionChoice(
                    index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=None
                )
                yield self._chunk(output, [text])
            if delta.finish_reason is not None:
                finish = CompletionChoice(
                    index=delta.index,
                    text="",
                    logprobs=None,
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                )
                yield self._chunk(output, [finish])

    def closing_chunks(self, final: RequestOutput) -> Iterator[Completion]:
        if self._include_usage:
            yield self._chunk(final, [], usage(final))

    def _chunk(
        self, output: RequestOutput, choices: list[CompletionChoice], totals: Usage | None = None
    ) -> Completion:
        return Completion(
            id=self._meta.id,
            created=self._meta.created,
            model=self._meta.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=choices,
            usage=totals,
            seed=self._meta.seed(output),
        )
