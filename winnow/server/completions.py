"""POST /v1/completions: the legacy text-completion API on the same engine and sampling fields."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import cast

from fastapi import Request, Response

from winnow.engine.outputs import PositionLogprobs, RequestOutput
from winnow.models import Tokenizer
from winnow.server.context import SYSTEM_FINGERPRINT, ServerContext, engine_request_id, request_id
from winnow.server.errors import ApiError, client_errors
from winnow.server.generation import Generation, ResponseMeta, collect, finite_logprob, usage
from winnow.server.params import sampling_params
from winnow.server.prompt_batch import GenerationBatch
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
from winnow.server.tokenizer_pool import with_tokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint
# Engine-side names -> this endpoint's fields.
_RENAMES = {"top_logprobs": "logprobs", "messages": "prompt"}


def check_supported(request: CompletionRequest) -> None:
    if request.echo:
        raise ApiError(400, "echo is not supported yet", param="echo")
    if request.suffix is not None:
        raise ApiError(400, "suffix is not supported by this model", param="suffix")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise ApiError(400, "best_of other than n is not supported", param="best_of")


def prompt_batch(
    tokenizer: Tokenizer,
    *,
    prompt: str | list[str] | list[int] | list[list[int]],
    vocab_size: int,
    max_model_len: int | None = None,
) -> list[list[int]]:
    """The request's prompts as token ids: one text or token-id list, or a list of either.
    Tokenises, so it runs on a tokenizer worker thread (`with_tokenizer`)."""
    if isinstance(prompt, str):
        return [text_prompt(tokenizer, prompt, max_model_len=max_model_len)]
    if not prompt:
        raise ApiError(400, "prompt must not be an empty list", param="prompt")
    if all(isinstance(item, int) for item in prompt):
        prompt = [cast("list[int]", prompt)]
    batch: list[list[int]] = []
    for index, item in enumerate(cast("list[str | list[int]]", prompt)):
        if isinstance(item, str):
            batch.append(text_prompt(tokenizer, item, max_model_len=max_model_len))
            continue
        if not item:
            raise ApiError(400, f"prompt {index} has no tokens", param="prompt")
        check_token_ids(item, vocab_size, "prompt")
        batch.append(list(item))
    return batch


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
            logprobs=None if body.logprobs is None else True,
            top_logprobs=body.logprobs,
            defaults=ctx.engine.sampling_defaults,
        )
    job = partial(
        prompt_batch,
        prompt=body.prompt,
        vocab_size=ctx.engine.vocab_size,
        max_model_len=ctx.engine.max_model_len,
    )
    prompts = await with_tokenizer(ctx.engine.tokenizer, job, size=len(await request.body()))
    if len(prompts) * params.n > ctx.engine.admission_capacity:
        raise ApiError(
            400,
            f"{len(prompts)} prompts x n={params.n} choices is more than this server ever "
            f"admits at once ({ctx.engine.admission_capacity} sequences)",
            param="n" if params.n > ctx.engine.admission_capacity else "prompt",
        )
    grammar = await prepare_grammar(ctx.engine, partial(grammar_spec, body.response_format))
    public_id = f"cmpl-{request_id(request)}"

    def start(index: int) -> Generation:
        return Generation(
            ctx.engine,
            engine_request_id(public_id),
            prompts[index],
            params,
            metrics=ctx.metrics,
            text_continues_prompt=True,
            grammar=grammar,
        )

    with client_errors(_RENAMES):
        batch = GenerationBatch(start, len(prompts), params.n)
    meta = ResponseMeta.of(public_id, model, body.seed)
    if body.stream:
        builder = CompletionChunkBuilder(meta, batch, include_usage, params.logprobs)
        return sse_response(batch, sse_body(batch, builder, ctx.keepalive_s))
    result = await collect(batch, request, len(prompts) * params.n)
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
        seed=response_seed(meta, batch),
    )
    return Response(completion.model_dump_json(), media_type="application/json")


def response_seed(meta: ResponseMeta, batch: GenerationBatch) -> int | list[int]:
    """The request's own seed (list) if it sent one; else the seed each prompt used, as one
    int for a single prompt or a list in prompt order."""
    if meta.seeds is not None:
        return meta.seeds
    seeds = [seed for seed in batch.seeds if seed is not None]
    return seeds[0] if len(set(seeds)) == 1 else seeds


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
    choice finished, the usage chunk if asked for. A choice's chunks carry the seed of its
    prompt; the usage chunk carries the response's seed (see response_seed)."""

    def __init__(
        self, meta: ResponseMeta, batch: GenerationBatch, include_usage: bool, logprobs: bool
    ) -> None:
        self._meta = meta
        self._batch = batch
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
                yield self._chunk(self._meta.seed(output), [text])
            if delta.finish_reason is not None:
                finish = CompletionChoice(
                    index=delta.index,
                    text="",
                    logprobs=None,
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                )
                yield self._chunk(self._meta.seed(output), [finish])

    def closing_chunks(self, final: RequestOutput) -> Iterator[Completion]:
        if self._include_usage:
            yield self._chunk(response_seed(self._meta, self._batch), [], usage(final))

    def _chunk(
        self,
        seed: int | list[int],
        choices: list[CompletionChoice],
        totals: Usage | None = None,
    ) -> Completion:
        return Completion(
            id=self._meta.id,
            created=self._meta.created,
            model=self._meta.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=choices,
            usage=totals,
            seed=seed,
        )
