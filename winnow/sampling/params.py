"""Per-request sampling parameters, validated as docs/sampling.md states (docs/errors-and-limits.md
lists every range). The defaults here are the only defaults of the request fields: the server
passes only the fields a request sets. The bounds come from `winnow.limits`, shared with the
request models."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from winnow.limits import (
    INT64_MAX,
    INT64_MIN,
    LOGIT_BIAS_LIMIT,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_STOP_TOTAL_CHARS,
    MAX_TOP_LOGPROBS,
    PENALTY_MAX,
    TEMPERATURE_MAX,
    InvalidRequest,
)

GREEDY_TEMPERATURE = 1e-5


class SamplingParamError(InvalidRequest):
    """A sampling parameter is out of range; `param` names the offending request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param=param)


@dataclass(frozen=True)
class SamplingParams:
    """Everything that shapes how one choice of a request is sampled and when it stops.

    `seed` is the request's seed (None: the engine draws a random one at admission);
    `choice_seeds`, when given (a list of n seeds in the request), seeds each choice directly.
    `max_tokens` None means "up to the context"; the engine resolves it at admission.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    choice_seeds: tuple[int, ...] = ()
    n: int = 1
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    logprobs_mode: Literal["raw", "processed"] = "raw"
    time_limit_ms: float | None = None

    def __post_init__(self) -> None:
        _check_int64("top_k", self.top_k)
        _check_int64("n", self.n)
        _check_int64("max_tokens", self.max_tokens or 0)
        _check_int64("min_tokens", self.min_tokens)
        _check_range("temperature", self.temperature, 0.0, TEMPERATURE_MAX)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        if self.top_k < -1:
            raise SamplingParamError("top_k", "top_k must be -1, 0 (off) or a positive integer")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("xtc_probability", self.xtc_probability, 0.0, 1.0)
        _check_range("xtc_threshold", self.xtc_threshold, 0.0, 1.0)
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise SamplingParamError(
                "repetition_penalty", "repetition_penalty must be a finite number > 0"
            )
        _check_range("frequency_penalty", self.frequency_penalty, -PENALTY_MAX, PENALTY_MAX)
        _check_range("presence_penalty", self.presence_penalty, -PENALTY_MAX, PENALTY_MAX)
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise SamplingParamError(
                "logit_bias", f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries"
            )
        for token_id, bias in self.logit_bias.items():
            if not (math.isfinite(bias) and -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT):
                raise SamplingParamError(
                    "logit_bias",
                    f"logit_bias[{token_id}] must be between "
                    f"{-LOGIT_BIAS_LIMIT:g} and {LOGIT_BIAS_LIMIT:g}",
                )
        if self.seed is not None and not INT64_MIN <= self.seed <= INT64_MAX:
            raise SamplingParamError("seed", "seed must fit in a signed 64-bit integer")
        if self.n < 1:
            raise SamplingParamError("n", "n must be at least 1")
        if self.choice_seeds and len(self.choice_seeds) != self.n:
            raise SamplingParamError("seed", "a list of seeds must have exactly n entries")
        if any(not INT64_MIN <= s <= INT64_MAX for s in self.choice_seeds):
            raise SamplingParamError("seed", "seeds must fit in a signed 64-bit integer")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingParamError("max_tokens", "max_tokens must be at least 1")
        if self.min_tokens < 0:
            raise SamplingParamError("min_tokens", "min_tokens must be at least 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamError("min_tokens", "min_tokens must not exceed max_tokens")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in self.stop):
            raise SamplingParamError("stop", "stop strings must be non-empty")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise SamplingParamError(
                "stop", f"a stop string may be at most {MAX_STOP_STRING_CHARS} characters long"
            )
        if sum(len(s) for s in self.stop) > MAX_STOP_TOTAL_CHARS:
            raise SamplingParamError(
                "stop", f"the stop strings may be at most {MAX_STOP_TOTAL_CHARS} characters in all"
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamError(
                "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop token ids"
            )
        if any(not 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise SamplingParamError("stop_token_ids", "token ids must be between 0 and 2**63-1")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingParamError(
                "top_logprobs", f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"
            )
        if self.top_logprobs > 0 and not self.logprobs:
            raise SamplingParamError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.logprobs_mode not in ("raw", "processed"):
            raise SamplingParamError("logprobs_mode", "logprobs_mode must be 'raw' or 'processed'")
        if self.time_limit_ms is not None and not (
            math.isfinite(self.time_limit_ms) and self.time_limit_ms > 0
        ):
            raise SamplingParamError("time_limit", "time_limit must be a number of ms > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def check_vocab(self, vocab_size: int) -> None:
        """Reject token ids outside the logits width (needs the model, so not in __post_init__)."""
        for token_id in self.logit_bias:
            if not 0 <= token_id < vocab_size:
                raise SamplingParamError(
                    "logit_bias", f"logit_bias token id {token_id} is outside [0, {vocab_size})"
                )
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise SamplingParamError(
                    "stop_token_ids", f"stop token id {token_id} is outside [0, {vocab_size})"
                )


def _check_int64(param: str, value: int) -> None:
    if not INT64_MIN <= value <= INT64_MAX:
        raise SamplingParamError(param, f"{param} must fit in a signed 64-bit integer")


def _check_range(param: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise SamplingParamError(param, f"{param} must be between {low:g} and {high:g}")
