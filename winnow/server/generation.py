"""Running one request on the engine from a route: submit, consume, and abort on the way out.

Whatever ends the consumer early (client disconnect, cancellation, an error) aborts the request
in the engine, so its KV blocks are freed within one step.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from starlette.requests import Request

from winnow.engine.outputs import FinishReason, PositionLogprobs, RequestOutput
from winnow.engine.request import GenerationRequest
from winnow.limits import LOGPROB_FLOOR
from winnow.sampling.params import SamplingParams
from winnow.server.errors import ClientDisconnected
from winnow.server.metrics import ServerMetrics
from winnow.server.protocol import PromptTokensDetails, Usage
from winnow.structured.backend import CompiledGrammar
from winnow.structured.spec import GrammarSpec

if TYPE_CHECKING:
    from winnow.engine.async_engine import AsyncEngine, RequestStream


class OutputSource(Protocol):
    """What a route consumes: one engine request (Generation) or several seen as one."""

    def outputs(self) -> AsyncIterator[RequestOutput]: ...

    def close(self) -> None: ...


class Generation:
    """One admitted engine request. Submitting raises RequestRejected / EngineOverloaded /
    EngineDeadError, so a route learns about them before it has sent anything.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        *,
        metrics: ServerMetrics,
        text_continues_prompt: bool = False,
        grammar: tuple[GrammarSpec, CompiledGrammar] | None = None,
    ) -> None:
        """`grammar`: the request's constraint and its compiled form (see response_format)."""
        self._engine = engine
        self._metrics = metrics
        request = GenerationRequest(
            request_id,
            prompt,
            params,
            text_continues_prompt=text_continues_prompt,
            grammar=grammar[0] if grammar is not None else None,
        )
        self._stream: RequestStream = engine.submit(
            request, grammar[1] if grammar is not None else None
        )
        self._started = time.monotonic()
        self._seen_token = False
        self.finished = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The request's deltas; the request is aborted if iteration stops before the end."""
        try:
            async for output in self._stream:
                self.finished = output.finished
                self._observe(output)
                yield output
        finally:
            self.close()

    def _observe(self, output: RequestOutput) -> None:
        elapsed = time.monotonic() - self._started
        if not self._seen_token and any(choice.token_ids for choice in output.choices):
            self._seen_token = True
            self._metrics.first_token(elapsed)
        for choice in output.choices:
            if choice.finish_reason is not None:
                self._metrics.choice_finished(choice.finish_reason)
        if output.finished:
            self._metrics.request_finished(output, elapsed)

    def close(self) -> None:
        if not self.finished:
            self._engine.abort(self._stream.request_id)


@dataclass(frozen=True)
class ResponseMeta:
    """What every chunk or body of one response repeats."""

    id: str
    created: int
    model: str
    seeds: list[int] | None  # the request's list of per-choice seeds, when it sent one

    @classmethod
    def of(cls, response_id: str, model: str, request_seed: int | list[int] | None) -> ResponseMeta:
        seeds = request_seed if isinstance(request_seed, list) else None
        return cls(response_id, int(time.time()), model, seeds)

    def seed(self, output: RequestOutput) -> int | list[int]:
        return self.seeds if self.seeds is not None else output.seed


@dataclass
class ChoiceResult:
    index: int
    text_parts: list[str] = field(default_factory=list)
    token_id_parts: list[list[int]] = field(default_factory=list)  # per delta, like text_parts
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def final_reason(self) -> FinishReason:
        """The finish_reason of a choice the engine finished (it always gives one)."""
        assert self.finish_reason is not None, f"choice {self.index} ended without a reason"
        return self.finish_reason


@dataclass
class GenerationResult:
    choices: list[ChoiceResult]
    final: RequestOutput


async def collect(generation: OutputSource, request: Request, n: int) -> GenerationResult:
    """Run to the end, concatenating each choice's deltas; abort if the client disconnects."""
    choices = [ChoiceResult(i) for i in range(n)]

    async def consume() -> RequestOutput | None:
        output = None
        async for output in generation.outputs():
            for delta in output.choices:
                choice = choices[delta.index]
                choice.text_parts.append(delta.text)
                choice.token_id_parts.append(delta.token_ids)
                choice.logprobs.extend(delta.logprobs or ())
                if delta.finish_reason is not None:
                    choice.finish_reason = delta.finish_reason
                    choice.stop_reason = delta.stop_reason
        return output

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
        generation.close()
    if consumer.cancelled() or not consumer.done():
        raise ClientDisconnected
    final = consumer.result()
    assert final is not None, "the engine ended a request without output"
    return GenerationResult(choices, final)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage(output: RequestOutput) -> Usage:
    return Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=output.cached_tokens),
    )


def finite_logprob(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR
