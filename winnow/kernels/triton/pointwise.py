"""Fused pointwise kernels of a decoder layer on CUDA, one launch each where torch takes several:
RMSNorm with its residual add, SiLU x up, and RoPE on q and k with the KV write.

Each computes in fp32 and rounds once to the output dtype (torch's reference rounds after every
operation). On a CPU they run only under Triton's interpreter (TRITON_INTERPRET=1 set before
this module is imported), which is how the tests check them against the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from winnow.kernels.triton.launch import cache_strides

SILU_BLOCK = 1024  # columns of gate/up per silu_mul program


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    delta_ptr,
    weight_ptr,
    out_ptr,
    heads,
    stride_x,
    stride_xh,
    stride_delta,
    stride_out,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_DELTA: tl.constexpr,
):
    """One program per row (x's rows are [tokens, heads], e.g. q heads sliced from the qkv
    output): (x += delta, stored back, when HAS_DELTA), then out = rms_norm(x)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x_row = x_ptr + (row // heads) * stride_x + (row % heads) * stride_xh
    x = tl.load(x_row + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_row + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = (xf * inv_rms * weight).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> torch.Tensor:
    """rms_norm over the last dim of x [T, N] or [T, H, N] (any token and head strides) -> a
    new contiguous tensor; with `delta` (x's shape), first x += delta in place (the residual
    add), rounded to x's dtype as torch's add_ does."""
    shape = x.shape
    if x.stride(-1) != 1 or x.dim() not in (2, 3):
        if delta is not None:
            raise ValueError("the residual stream must be [T, N] with contiguous rows")
        x = x.contiguous().view(-1, x.shape[-1])
    n = x.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    stride_h = x.stride(1) if x.dim() == 3 else 0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = out.numel() // n if n else 0
    if rows == 0:
        return out.view(shape)
    d2 = out if delta is None else delta.reshape(rows, n)
    if d2.stride(-1) != 1:
        d2 = d2.contiguous()
    _rms_norm_kernel[(rows,)](
        x, d2, weight, out, heads, x.stride(0), stride_h, d2.stride(0), n, eps,
        N=n, BLOCK=triton.next_power_of_2(n), HAS_DELTA=delta is not None,
    )  # fmt: skip
    return out.view(shape)


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_in,
    stride_out,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, column block): out = silu(gate) * up, gate and up the halves of the row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + N + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 I] (gate, then up) -> silu(gate) * up [T, I]."""
    tokens, width = gate_up.shape
    half = width // 2
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty((tokens, half), dtype=gate_up.dtype, device=gate_up.device)
    if tokens == 0:
        return out
    grid = (tokens, triton.cdiv(half, SILU_BLOCK))
    _silu_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), N=half, BLOCK=SILU_BLOCK)
    return out


@triton.jit
def _rotate(x_ptr, heads, halves, mask, cos, sin, HALF: tl.constexpr):
    """The rotated halves (fp32) of the [heads, HALF] tile at x_ptr (head stride folded in)."""
    x1 = tl.load(x_ptr + heads + halves, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + heads + halves + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    cache_ptr,
    slots_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_qot,
    stride_kot,
    stride_kv,
    stride_slot,
    stride_head,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    """One program per token: q and k rotated into q_out / k_out, and with WRITE_CACHE the
    rotated k and v stored into the token's cache slot (a negative slot, a padding row, is
    skipped)."""
    token = tl.program_id(0).to(tl.int64)
    halves = tl.arange(0, HALF_PAD)[None, :]
    half_mask = halves < HALF
    cos = tl.load(cos_ptr + token * stride_cos + halves, mask=half_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_cos + halves, mask=half_mask, other=0.0).to(tl.float32)

    q_heads = tl.arange(0, Q_HEADS_PAD)[:, None]
    q_mask = (q_heads < NUM_Q_HEADS) & half_mask
    q1, q2 = _rotate(q_ptr + token * stride_qt, q_heads * stride_qh, halves, q_mask, cos, sin, HALF)
    q_dst = q_out_ptr + token * stride_qot + q_heads * (2 * HALF) + halves
    tl.store(q_dst, q1.to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_dst + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=q_mask)

    kv_heads = tl.arange(0, KV_HEADS_PAD)[:, None]
    kv_mask = (kv_heads < NUM_KV_HEADS) & half_mask
    k1, k2 = _rotate(
        k_ptr + token * stride_kt, kv_heads * stride_kh, halves, kv_mask, cos, sin, HALF
    )
    k1 = k1.to(k_out_ptr.dtype.element_ty)
    k2 = k2.to(k_out_ptr.dtype.element_ty)
    k_dst = k_out_ptr + token * stride_kot + kv_heads * (2 * HALF) + halves
    tl.store(k_dst, k1, mask=kv_mask)
    tl.store(k_dst + HALF, k2, mask=kv_mask)
    if WRITE_CACHE:
        slot = tl.load(slots_ptr + token)
        if slot >= 0:
            v_src = v_ptr + token * stride_vt + kv_heads * stride_vh + halves
            v1 = tl.load(v_src, mask=kv_mask, other=0.0)
            v2 = tl.load(v_src + HALF, mask=kv_mask, other=0.0)
            dst = cache_ptr + slot.to(tl.int64) * stride_slot + kv_heads * stride_head + halves
            element = cache_ptr.dtype.element_ty
            tl.store(dst, k1.to(element), mask=kv_mask)
            tl.store(dst + HALF, k2.to(element), mask=kv_mask)
            tl.store(dst + stride_kv, v1.to(element), mask=kv_mask)
            tl.store(dst + stride_kv + HALF, v2.to(element), mask=kv_mask)


def rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    v: torch.Tensor | None = None,
    kv_cache: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] (any head/token strides) rotated by cos/sin [T, 1, D / 2]
    -> new contiguous (q, k). Given v, a [2, blocks, block_size, Hkv, D] cache and flat
    `slots` [T], the same launch also stores the rotated k and v into the cache."""
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = head_dim // 2
    q_out = torch.empty((tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    write = kv_cache is not None
    if write:
        assert v is not None and slots is not None and kv_cache is not None
        stride_kv, stride_block, stride_slot, stride_head = cache_strides(kv_cache)
        if stride_block != kv_cache.shape[2] * stride_slot:
            raise ValueError("the KV cache's blocks must be contiguous to address it by flat slot")
    else:
        v, kv_cache, slots = k, k_out, k_out
        stride_kv = stride_slot = stride_head = 0
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("rope_qk needs q, k and v with a contiguous head_dim")
    cos2, sin2 = cos.reshape(tokens, half), sin.reshape(tokens, half)
    if cos2.stride(-1) != 1 or sin2.stride(0) != cos2.stride(0) or sin2.stride(-1) != 1:
        cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    _rope_kv_kernel[(tokens,)](
        q, k, v, cos2, sin2, q_out, k_out, kv_cache, slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos2.stride(0), q_out.stride(0), k_out.stride(0), stride_kv, stride_slot, stride_head,
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(max(1, num_kv_heads)),  # rope(q) alone: no k
        HALF=half, HALF_PAD=triton.next_power_of_2(half), WRITE_CACHE=write,
    )  # fmt: skip
    return q_out, k_out
