"""The fused Triton pointwise kernels against the torch reference evaluated in float64.

Without CUDA the kernels run under Triton's interpreter, switched on before they are defined.

Tolerances follow from the arithmetic. Each kernel computes in fp32 from inputs in the dtype and
rounds once to it: r = the dtype's unit roundoff (2u under the interpreter for 16-bit types,
which rounds fp32 -> 16 bits by truncation; u32 for fp32), plus an absolute r * (smallest normal)
below the normal range, where fp16's spacing stops shrinking. The float64 reference is exact to
well below u32, so:
- RMSNorm: the mean square of N fp32 terms is within gamma(N + 1) relative, the square root and
  the division add a few u32 (the GPU's approximate sqrt: 2 ulp each), the weight product one more;
  halving the first for the inverse root: |err| <= |y| * (gamma(N + 1) / 2 + 8 u32 + r).
- RoPE: x1 c - x2 s in fp32 is within 3 u32 (|x1 c| + |x2 s|), then rounded: r |y| more.
- SiLU x up: exp(-g) is evaluated as exp2(-g log2 e): the product's rounding is magnified by
  |g| log2 e, plus 2 ulp for exp2; the sum, the division and the product add one u32 each:
  |err| <= |y| * ((1.5 |g| + 6) u32 + r).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tests.tolerances import FP32_UNIT_ROUNDOFF as U32  # noqa: E402
from tests.tolerances import UNIT_ROUNDOFF, assert_within, gamma  # noqa: E402
from winnow.kernels.torch_ops import TorchPointwise  # noqa: E402
from winnow.kernels.triton import pointwise  # noqa: E402
from winnow.kernels.triton.fused import TritonPointwise  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REFERENCE = TorchPointwise()
TRITON = TritonPointwise()

if INTERPRETED and isinstance(pointwise._rms_norm_kernel, triton.JITFunction):
    raise RuntimeError("winnow.kernels.triton was imported before TRITON_INTERPRET=1 was set")


def rounding(dtype: torch.dtype) -> float:
    """r: the error of one rounding of an fp32 result to `dtype`, relative."""
    u = UNIT_ROUNDOFF[dtype]
    return 2 * u if INTERPRETED and dtype != torch.float32 else u


def underflow(dtype: torch.dtype) -> float:
    """The absolute error of one rounding among `dtype`'s subnormals."""
    return torch.finfo(dtype).smallest_normal * rounding(dtype)


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [64, 96])
def test_rms_norm_with_and_without_the_residual_add(dtype: torch.dtype, size: int) -> None:
    hidden = randn(5, size, dtype=dtype, seed=1, scale=3.0)
    delta = randn(5, size, dtype=dtype, seed=2)
    weight = randn(size, dtype=dtype, seed=3)
    r = rounding(dtype)
    relative = gamma(size + 1) / 2 + 8 * U32 + r

    expected = REFERENCE.rms_norm(hidden.double(), weight.double(), 1e-6)
    got = TRITON.rms_norm(hidden, weight, 1e-6)
    assert got.dtype == dtype
    assert_within(got, expected, relative * expected.abs() + underflow(dtype))

    exact_sum = hidden.double() + delta.double()
    residual = hidden.clone()
    normed = TRITON.add_rms_norm(residual, delta, weight, 1e-6)
    assert_within(
        residual, exact_sum, r * exact_sum.abs() + underflow(dtype)
    )  # updated in place, rounded once
    expected = REFERENCE.rms_norm(residual.double(), weight.double(), 1e-6)
    assert_within(normed, expected, relative * expected.abs() + underflow(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_heads_sliced_from_a_fused_row(dtype: torch.dtype) -> None:
    """Qwen3's q/k norms: [T, H, D] views into the qkv output, normed per head in place of a
    copy."""
    qkv = randn(4, 5 * 32, dtype=dtype, seed=7, scale=2.0)
    heads = qkv[:, 32:].view(4, 4, 32)
    weight = randn(32, dtype=dtype, seed=8)
    expected = REFERENCE.rms_norm(heads.double(), weight.double(), 1e-6)
    got = TRITON.rms_norm(heads, weight, 1e-6)
    relative = gamma(33) / 2 + 8 * U32 + rounding(dtype)
    assert got.shape == heads.shape
    assert_within(got, expected, relative * expected.abs() + underflow(dtype))


def rope_bound(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """3 u32 (|x1 c| + |x2 s|) + r |y| (+ underflow) for each output element (see the module
    docstring)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].double().abs(), x[..., half:].double().abs()
    c, s = cos.double().abs(), sin.double().abs()
    first, second = x1 * c + x2 * s, x2 * c + x1 * s
    exact = REFERENCE.rope(x.double(), cos.double(), sin.double()).abs()
    bound = 3 * U32 * torch.cat([first, second], -1) + rounding(x.dtype) * exact
    return bound + underflow(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 64), (6, 3, 80)])
def test_rope_on_q_and_k_writes_the_cache(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    """q and k as views into one fused qkv row (as the model slices them); the rotated k and
    the v of each token land in its slot, a padding token (slot -1) writes nothing."""
    tokens = 5
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=4, scale=2.0)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    angles = torch.rand(tokens, 1, head_dim // 2, generator=torch.Generator().manual_seed(5)) * 7
    cos, sin = angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)
    block_size = 4
    cache = torch.zeros(2, 6, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    slots = torch.tensor([9, 2, -1, 23, 12], device=DEVICE)

    got_q, got_k = TRITON.rope_qk(q, k, cos, sin)
    assert_within(
        got_q, REFERENCE.rope(q.double(), cos.double(), sin.double()), rope_bound(q, cos, sin)
    )
    assert_within(
        got_k, REFERENCE.rope(k.double(), cos.double(), sin.double()), rope_bound(k, cos, sin)
    )

    assert torch.equal(TRITON.rope(q, cos, sin), got_q)  # one tensor alone
    fused_q, fused_k = pointwise.rope_qk(q, k, cos, sin, v, cache, slots)
    assert torch.equal(fused_q, got_q) and torch.equal(fused_k, got_k)
    flat = cache.view(2, -1, kv_heads, head_dim)
    written = slots >= 0
    assert torch.equal(flat[0, slots[written]], got_k[written])
    assert torch.equal(flat[1, slots[written]], v[written])
    untouched = torch.ones(flat.shape[1], dtype=torch.bool, device=DEVICE)
    untouched[slots[written]] = False
    assert not flat[:, untouched].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [96, 1500])
def test_silu_mul(dtype: torch.dtype, intermediate: int) -> None:
    gate_up = randn(3, 2 * intermediate, dtype=dtype, seed=6, scale=4.0)
    expected = REFERENCE.silu_mul(gate_up.double())
    got = TRITON.silu_mul(gate_up)
    gate = gate_up[:, :intermediate].double().abs()
    bound = expected.abs() * ((1.5 * gate + 6) * U32 + rounding(dtype)) + underflow(dtype)
    assert got.dtype == dtype
    assert_within(got, expected, bound)
