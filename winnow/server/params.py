"""Request fields -> SamplingParams. Only the fields a request sets are passed on, over the
model's defaults (--generation-config), so a field left out takes `SamplingParams`' own default.
Ranges are checked by SamplingParams itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from winnow.sampling.params import SamplingParams
from winnow.server.errors import ApiError
from winnow.server.protocol import GenerationFields

# Request fields that SamplingParams takes under the same name and in the same form.
_SAME_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "xtc_probability",
    "xtc_threshold",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "n",
    "min_tokens",
    "ignore_eos",
    "include_stop_str_in_output",
    "logprobs_mode",
)


def sampling_params(
    request: GenerationFields,
    *,
    max_tokens: int | None,
    logprobs: bool | None,
    top_logprobs: int | None,
    defaults: Mapping[str, float],
) -> SamplingParams:
    """The engine's parameters; raises SamplingParamError for a value out of range.

    `max_tokens`, `logprobs` and `top_logprobs` come from the route, which names them its own
    way (None: not set). `defaults` (the model's, from --generation-config) replace
    SamplingParams' defaults of the fields a request leaves out."""
    fields: dict[str, Any] = dict(defaults)
    if "top_k" in fields:
        fields["top_k"] = int(fields["top_k"])
    for name in _SAME_FIELDS:
        value = getattr(request, name)
        if value is not None:
            fields[name] = value
    routed = {"max_tokens": max_tokens, "logprobs": logprobs, "top_logprobs": top_logprobs}
    fields.update({name: value for name, value in routed.items() if value is not None})
    if request.logit_bias is not None:
        fields["logit_bias"] = _logit_bias(request.logit_bias)
    if isinstance(request.seed, list):
        fields["choice_seeds"] = tuple(request.seed)
    elif request.seed is not None:
        fields["seed"] = request.seed
    if request.stop is not None:
        fields["stop"] = _as_tuple(request.stop)
    if request.stop_token_ids is not None:
        fields["stop_token_ids"] = _as_tuple(request.stop_token_ids)
    if request.time_limit is not None:
        fields["time_limit_ms"] = request.time_limit
    return SamplingParams(**fields)


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


def _logit_bias(raw: dict[str, float]) -> dict[int, float]:
    """JSON object keys are strings: each must spell a token id."""
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise ApiError(
                400, f"logit_bias key {key!r} is not a token id", param="logit_bias"
            ) from None
        bias[token_id] = float(value)
    return bias
