"""Rounding-error bounds for comparing two floating-point implementations of the same maths.

Two correct implementations differ only in the order and fusion of their roundings, so each is
within the standard forward-error bound of the exact result, and they are within twice that of
each other (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3): a sum or dot
product of k terms, in any order, lands within gamma(k) * sum(|terms|) of the exact value, with
gamma(k) = k u / (1 - k u) and u the format's unit roundoff. These bounds hold on any CPU
whatever its vector width or BLAS, which is the point: no tolerance here is fitted to a run.
"""

from __future__ import annotations

import torch
import transformers

FP32_UNIT_ROUNDOFF = 2.0**-24
UNIT_ROUNDOFF = {
    torch.float32: FP32_UNIT_ROUNDOFF,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def gamma(k: int, u: float = FP32_UNIT_ROUNDOFF) -> float:
    return k * u / (1.0 - k * u)


def linear_tolerance(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Elementwise bound on |a - b| for two fp32 evaluations of x @ weight.T (+ bias)."""
    terms = x.abs().double() @ weight.abs().double().T
    k = x.shape[-1]
    if bias is not None:
        terms = terms + bias.abs().double()
        k += 1
    return 2.0 * gamma(k) * terms


def assert_within(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float) -> None:
    """|got - expected| <= bound elementwise, with the worst offender in the message."""
    excess = (got.double() - expected.double()).abs() - torch.as_tensor(bound, dtype=torch.float64)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"|got - expected| exceeds its rounding bound by {float(excess.flatten()[worst]):.3g} "
        f"at flat index {worst}"
    )


def _head_scale(hf_model: transformers.PreTrainedModel) -> float:
    """max_w ||w||_2 * max|g| * sqrt(H): bounds sum(|w_k h_k|) for every logit w . h, h being the
    final RMSNorm's output with gain g (x / rms(x) has norm sqrt(H))."""
    row_norm = float(hf_model.lm_head.weight.detach().float().norm(dim=1).max())
    gain = float(hf_model.model.norm.weight.detach().abs().max())
    return row_norm * gain * hf_model.config.hidden_size**0.5


def logit_tolerance(hf_model: transformers.PreTrainedModel, u: float = FP32_UNIT_ROUNDOFF) -> float:
    """Bound on |a - b| between two evaluations of a decoder's logits (the Hugging Face model
    `hf_model` describes the network) whose every operation rounds with unit roundoff u.

    Each of the L layers and the head adds at most gamma(K) of relative error to the hidden
    state, K being the longest dot product in the network (hidden, intermediate or attention
    width); RMSNorm rescales the state before every layer and the head, so a relative error
    passes on without growing. One evaluation's logit error is then at most
    (L + 1) gamma(K) sum(|w_k h_k|); two evaluations differ by at most twice that.
    """
    config = hf_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    k = max(config.hidden_size, config.intermediate_size, config.num_attention_heads * head_dim)
    return 2.0 * (config.num_hidden_layers + 1) * gamma(k, u) * _head_scale(hf_model)


def kv_cache_tolerance(hf_model: transformers.PreTrainedModel, kv_dtype: torch.dtype) -> float:
    """Bound on how far logits move when cached keys and values are rounded to `kv_dtype`.

    Rounding is one relative error of at most u per cached element, on the keys and on the
    values of each of the L layers; as above, a relative error in a layer's output passes
    through the normalised layers after it without growing. Two evaluations that both round
    (say to different neighbours, when their fp32 keys differ in the last bit) differ by at
    most twice that, plus their fp32 difference.
    """
    u = UNIT_ROUNDOFF[kv_dtype]
    rounding = 2.0 * hf_model.config.num_hidden_layers * 2.0 * u * _head_scale(hf_model)
    return rounding + logit_tolerance(hf_model)
