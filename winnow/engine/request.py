"""A request as the server submits it to the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from winnow.limits import InvalidRequest
from winnow.sampling.params import SamplingParams
from winnow.structured.spec import GrammarSpec


@dataclass(frozen=True)
class GenerationRequest:
    """`text_continues_prompt`: the output text continues the prompt's text (legacy completions),
    so it is detokenised in the prompt's context (a leading SentencePiece space is kept); a chat
    reply is a new message and is detokenised on its own. `grammar`, when set, constrains every
    choice's output (response_format, forced tool calls)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    text_continues_prompt: bool = False
    grammar: GrammarSpec | None = None


class RequestRejected(InvalidRequest):
    """The engine finds that the request can never be served as asked (400)."""


class EngineOverloaded(Exception):
    """The admission queue is full (429 with Retry-After)."""


class RequestFailed(Exception):
    """Making this request's output raised (a server bug): it ends with a 500, the engine and
    the other requests go on."""


class EngineDeadError(Exception):
    """The engine loop died; in-flight requests end with an error event."""


class EngineDraining(EngineDeadError):
    """The server is shutting down: no new requests, and the ones left at the deadline end."""
