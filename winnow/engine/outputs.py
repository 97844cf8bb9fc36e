"""What the engine hands to the server: per-step deltas of each request's choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(slots=True)  # not frozen: a frozen one sets its fields through object.__setattr__
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: list[int]


@dataclass(slots=True)
class PositionLogprobs:
    """Logprob of the sampled token at one position, plus the requested top alternatives."""

    sampled: TokenLogprob
    top: list[TokenLogprob]


@dataclass(slots=True)
class ChoiceDelta:
    """New output of one choice since the previous RequestOutput.

    `text` is safe to send: no broken UTF-8 and no part of a possible stop string.
    `stop_reason` is the matched stop string, the stop token id, or "time_limit".
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    choices: list[ChoiceDelta]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finished: bool
    seed: int
