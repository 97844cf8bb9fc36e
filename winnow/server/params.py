"""Request fields -> SamplingParams. Ranges are checked by SamplingParams itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from winnow.sampling.params import SamplingParams
from winnow.server.errors import ApiError
from winnow.server.protocol import GenerationFields


def sampling_params(
    request: GenerationFields,
    *,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    defaults: Mapping[str, float],
) -> SamplingParams:
    """The engine's parameters; raises SamplingParamError for a value out of range.

    `defaults` (the model's, from --generation-config) replace OpenAI's defaults of the fields
    a request leaves out."""
    seed = request.seed
    return SamplingParams(
        temperature=_or(request.temperature, defaults.get("temperature", 1.0)),
        top_p=_or(request.top_p, defaults.get("top_p", 1.0)),
        top_k=_or(request.top_k, int(defaults.get("top_k", 0))),
        min_p=_or(request.min_p, defaults.get("min_p", 0.0)),
        xtc_probability=_or(request.xtc_probability, 0.0),
        xtc_threshold=_or(request.xtc_threshold, 0.1),
        repetition_penalty=_or(request.repetition_penalty, defaults.get("repetition_penalty", 1.0)),
        frequency_penalty=_or(request.frequency_penalty, 0.0),
        presence_penalty=_or(request.presence_penalty, 0.0),
        logit_bias=_logit_bias(request.logit_bias),
        seed=seed if isinstance(seed, int) else None,
        choice_seeds=tuple(seed) if isinstance(seed, list) else (),
        n=_or(request.n, 1),
        max_tokens=max_tokens,
        min_tokens=_or(request.min_tokens, 0),
        stop=_as_tuple(request.stop),
        stop_token_ids=_as_tuple(request.stop_token_ids),
        ignore_eos=_or(request.ignore_eos, False),
        include_stop_str_in_output=_or(request.include_stop_str_in_output, False),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logprobs_mode=_or(request.logprobs_mode, "raw"),
        time_limit_ms=request.time_limit,
    )


T = TypeVar("T")


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _as_tuple(value: T | list[T] | None) -> tuple[T, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    """JSON object keys are strings: each must spell a token id."""
    bias: dict[int, float] = {}
    for key, value in (raw or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise ApiError(
                400, f"logit_bias key {key!r} is not a token id", param="logit_bias"
            ) from None
        bias[token_id] = float(value)
    return bias
