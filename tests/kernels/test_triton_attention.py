"""The Triton paged-attention kernels against an fp32 reference, on random paged layouts.

Without CUDA the kernels run under Triton's interpreter, which must be switched on before they are
defined (at import); with CUDA the same tests run the compiled kernels on the GPU.

Tolerances follow from the arithmetic (u = unit roundoff of the compute dtype, the queries'):
the reference is exact fp32 attention over the very same (already rounded) q, k, v, so the kernel
differs only by (a) the probabilities rounded to the compute dtype before P @ V (<= u relative
each, so <= u * max|v| on the output), (b) the output rounded to it (<= u * max|v|), and (c) fp32
accumulation: a score's error is <= D * u32 * sum|q * k| * scale, which the softmax turns into
<= 2 * that * max|v|, and the P @ V sum adds <= n * u32 * max|v| for n keys.
The interpreter rounds fp32 -> bf16 by truncation, whose error bound is 2u rather than u.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tests.kernels.triton_launches import compile_for_sm90, recorded_launches  # noqa: E402
from tests.models.helpers import PagedRunner, make_hf_model, save_hf_model  # noqa: E402
from winnow.kernels.attention_metadata import AttentionMetadata  # noqa: E402
from winnow.kernels.torch_attention import TorchAttentionBackend  # noqa: E402
from winnow.kernels.torch_attention import write_kv as torch_write_kv  # noqa: E402
from winnow.kernels.triton import TritonAttentionBackend  # noqa: E402
from winnow.kernels.triton.decode import (  # noqa: E402
    _decode_kernel,
    paged_decode,
    rope_paged_decode,
    split_count,
)
from winnow.kernels.triton.kv_write import write_kv  # noqa: E402
from winnow.kernels.triton.pointwise import rope_qk  # noqa: E402
from winnow.kernels.triton.prefill import paged_prefill  # noqa: E402
from winnow.models import load_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
UNIT_ROUNDOFF = {F32: 2.0**-24, F16: 2.0**-11, BF16: 2.0**-8}

if INTERPRETED and isinstance(_decode_kernel, triton.JITFunction):
    raise RuntimeError(
        "winnow.kernels.triton was imported before TRITON_INTERPRET=1 was set: "
        "set it in the environment of this test run"
    )


@dataclass(frozen=True)
class Shape:
    group: int  # query heads per kv head
    kv_heads: int
    head_dim: int
    q_dtype: torch.dtype
    cache_dtype: torch.dtype
    block_size: int

    @property
    def heads(self) -> int:
        return self.group * self.kv_heads


# GQA 1 / 4 / 7 / 8, head_dim 64 / 128, fp32 / fp16 / bf16 (and wider queries over a narrower
# cache, as --kv-cache-dtype gives), block sizes that do and do not divide the key tiles.
SHAPES = [
    Shape(1, 2, 64, F32, F32, 16),
    Shape(4, 2, 128, F16, F16, 16),
    Shape(7, 1, 64, BF16, BF16, 8),
    Shape(8, 1, 128, F32, BF16, 32),
    Shape(4, 1, 64, F32, F16, 16),
]
SHAPE_IDS = [
    f"gqa{s.group}-d{s.head_dim}-{str(s.q_dtype)[6:]}-cache-{str(s.cache_dtype)[6:]}"
    for s in SHAPES
]


@dataclass
class PagedCase:
    """A step over a random paged layout: sequence i had `cached` tokens, gets `new` more."""

    shape: Shape
    lengths: list[tuple[int, int]]  # (cached, new) per sequence
    cache: torch.Tensor  # [2, blocks, block_size, kv_heads, head_dim], garbage where unused
    keys: list[torch.Tensor]  # per sequence [cached + new, kv_heads, head_dim] (fp32 values)
    values: list[torch.Tensor]
    q: torch.Tensor  # [T, heads, head_dim] in the compute dtype
    attn: AttentionMetadata

    def new_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's new keys/values [T, kv_heads, head_dim] in the compute dtype."""
        k = torch.cat([keys[c:] for keys, (c, _) in zip(self.keys, self.lengths, strict=True)])
        v = torch.cat([vals[c:] for vals, (c, _) in zip(self.values, self.lengths, strict=True)])
        return k.to(self.shape.q_dtype).to(DEVICE), v.to(self.shape.q_dtype).to(DEVICE)


def make_case(
    shape: Shape, lengths: list[tuple[int, int]], seed: int, write_new: bool = True
) -> PagedCase:
    """Cached tokens (and, with write_new, the new ones) placed in shuffled blocks; the rest of
    the cache holds large garbage that must never reach an output."""
    gen = torch.Generator().manual_seed(seed)
    block_size, kv = shape.block_size, (shape.kv_heads, shape.head_dim)
    need = sum(-(-(c + n) // block_size) for c, n in lengths)
    num_blocks = need + 3
    cache = (torch.randn(2, num_blocks, block_size, *kv, generator=gen) * 100).to(shape.cache_dtype)
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    keys, values, tables = [], [], []
    for cached, new in lengths:
        total = cached + new
        # Rounded to the cache dtype and then to the compute dtype: the values the kernel reads.
        seq_k, seq_v = (
            torch.randn(total, *kv, generator=gen).to(shape.cache_dtype).to(shape.q_dtype).float()
            for _ in range(2)
        )
        table = [free.pop() for _ in range(-(-total // block_size))]
        for p in range(total if write_new else cached):
            cache[0, table[p // block_size], p % block_size] = seq_k[p]
            cache[1, table[p // block_size], p % block_size] = seq_v[p]
        keys.append(seq_k)
        values.append(seq_v)
        tables.append(table)
    attn = AttentionMetadata.build(
        [n for _, n in lengths], [c + n for c, n in lengths], tables, block_size, device=DEVICE
    )
    tokens = sum(n for _, n in lengths)
    q = torch.randn(tokens, shape.heads, shape.head_dim, generator=gen).to(shape.q_dtype)
    return PagedCase(shape, lengths, cache.to(DEVICE), keys, values, q.to(DEVICE), attn)


def reference(case: PagedCase, window: int | None) -> torch.Tensor:
    """Exact fp32 attention of every new token over its sequence's keys -> [T, heads, D]."""
    outputs = []
    q = case.q.float().cpu()
    start = 0
    for keys, values, (cached, new) in zip(case.keys, case.values, case.lengths, strict=True):
        k = keys.repeat_interleave(case.shape.group, dim=1)  # [L, heads, D]
        v = values.repeat_interleave(case.shape.group, dim=1)
        scores = torch.einsum("nhd,lhd->hnl", q[start : start + new], k.float())
        behind = (cached + torch.arange(new))[:, None] - torch.arange(cached + new)[None, :]
        allowed = behind >= 0
        if window is not None:
            allowed &= behind < window
        scores = scores / math.sqrt(case.shape.head_dim)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        outputs.append(torch.einsum("hnl,lhd->nhd", probs, v.float()))
        start += new
    return torch.cat(outputs)


def score_mass(case: PagedCase) -> float:
    """max over (query, key) of sum_d |q_d k_d|, scaled as the scores are."""
    q = case.q.float().abs().cpu()
    mass = max(torch.einsum("thd,lgd->thlg", q, k.abs()).max().item() for k in case.keys)
    return mass / math.sqrt(case.shape.head_dim)


def tolerance(case: PagedCase) -> float:
    """The bound in the module docstring, from this case's own data."""
    u = UNIT_ROUNDOFF[case.shape.q_dtype]
    if INTERPRETED and case.shape.q_dtype == BF16:
        u *= 2  # truncation, not round-to-nearest
    u32 = UNIT_ROUNDOFF[F32]
    v_max = max(v.abs().max().item() for v in case.values)
    longest = max(c + n for c, n in case.lengths)
    return v_max * (2 * u + u32 * (2 * case.shape.head_dim * score_mass(case) + longest))


def check(out: torch.Tensor, case: PagedCase, window: int | None = None, slack: float = 0) -> None:
    expected = reference(case, window)
    assert out.dtype == case.shape.q_dtype and out.shape == expected.shape
    atol = tolerance(case) + slack
    torch.testing.assert_close(out.float().cpu(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_write_kv_matches_torch(shape: Shape) -> None:
    case = make_case(shape, [(3, 5), (0, 9), (17, 1)], seed=1, write_new=False)
    k, v = case.new_kv()
    expected = case.cache.clone()
    torch_write_kv(expected, k, v, case.attn.slot_mapping)
    write_kv(case.cache, k, v, case.attn.slot_mapping)
    if INTERPRETED and shape.cache_dtype == BF16 and shape.q_dtype != BF16:
        # The interpreter truncates fp32 -> bf16 where torch rounds to nearest: one bf16 ulp.
        ulp = expected.float().abs() * 2.0**-7
        assert ((case.cache.float() - expected.float()).abs() <= ulp).all()
    else:
        assert torch.equal(case.cache, expected)


def test_write_kv_skips_negative_slots() -> None:
    """Padding rows (slot -1, as a fixed-size batch has) write nothing."""
    case = make_case(SHAPES[0], [(2, 3)], seed=2, write_new=False)
    k, v = case.new_kv()
    slots = case.attn.slot_mapping.clone()
    slots[1] = -1
    kept = torch.tensor([0, 2], device=DEVICE)
    expected = case.cache.clone()
    torch_write_kv(expected, k[kept], v[kept], slots[kept])
    write_kv(case.cache, k, v, slots)
    assert torch.equal(case.cache, expected)


# Ragged decode lengths: a 1-token prompt, lengths on and off block boundaries, and one long
# enough to be cut into several context splits.
DECODE_LENGTHS = [(0, 1), (15, 1), (40, 1), (300, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_decode_matches_reference(shape: Shape) -> None:
    case = make_case(shape, DECODE_LENGTHS, seed=3)
    tables, lens = case.attn.block_tables, case.attn.seq_lens_tensor
    for splits in (1, 3):
        check(paged_decode(case.q, case.cache, tables, lens, None, splits), case)


def test_decode_padding_rows_give_zeros() -> None:
    """Rows of a fixed-size batch beyond its real sequences (length 0) come out as zeros and
    leave the real rows as they were."""
    case = make_case(SHAPES[0], DECODE_LENGTHS, seed=8)
    tables, lens = case.attn.block_tables, case.attn.seq_lens_tensor
    padded_lens = lens.clone()
    padded_lens[[0, 2]] = 0
    for splits in (1, 3):
        real = paged_decode(case.q, case.cache, tables, lens, None, splits)
        out = paged_decode(case.q, case.cache, tables, padded_lens, None, splits)
        assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
        assert torch.equal(out[[1, 3]], real[[1, 3]])


@pytest.mark.parametrize("window", [1, 7, 100])
def test_decode_sliding_window(window: int) -> None:
    case = make_case(SHAPES[2], DECODE_LENGTHS, seed=4)
    tables, lens = case.attn.block_tables, case.attn.seq_lens_tensor
    check(paged_decode(case.q, case.cache, tables, lens, window, 4), case, window)


def rope_decode_case(
    shape: Shape, lengths: list[tuple[int, int]], seed: int
) -> tuple[PagedCase, tuple[torch.Tensor, ...], torch.Tensor]:
    """A decode case whose new tokens come un-rotated, as views of one fused qkv row: -> (the
    case with its q and new keys replaced by their rotation by the separate RoPE + KV-write
    kernel, the un-rotated (q, k, v, cos, sin), the cache that kernel wrote)."""
    case = make_case(shape, lengths, seed, write_new=False)
    tokens, heads, d = case.q.shape
    kv = shape.kv_heads
    k, v = case.new_kv()
    qkv = torch.cat([case.q.flatten(1), k.flatten(1), v.flatten(1)], 1)
    q, k, v = qkv[:, : heads * d], qkv[:, heads * d : (heads + kv) * d], qkv[:, (heads + kv) * d :]
    q, k, v = q.view(tokens, heads, d), k.view(tokens, kv, d), v.view(tokens, kv, d)
    angles = torch.rand(tokens, 1, d // 2, generator=torch.Generator().manual_seed(seed)) * 7
    cos, sin = (f(angles).to(shape.q_dtype).to(DEVICE) for f in (torch.cos, torch.sin))
    written = case.cache.clone()
    q_rot, _ = rope_qk(q, k, cos, sin, v, written, case.attn.slot_mapping)
    case.q = q_rot
    new_keys = written.view(2, -1, kv, d)[0, case.attn.slot_mapping]  # as the kernels read them
    for i, (cached, _) in enumerate(case.lengths):
        case.keys[i][cached:] = new_keys[i].to(shape.q_dtype).float()
    return case, (q, k, v, cos, sin), written


def rotation_slack(case: PagedCase) -> float:
    """0 under the interpreter, where the fused decode rotates q and k with the very fp32
    operations of the separate RoPE kernel. A GPU compiler may contract their multiply-adds
    differently (FMA), leaving q and the new key one ulp of their dtypes apart (<= 2u relative):
    each score moves by <= 2 (u_q + u_cache) * its mass, the output by <= 2 * that * max|v|."""
    if INTERPRETED:
        return 0.0
    u = UNIT_ROUNDOFF[case.shape.q_dtype] + UNIT_ROUNDOFF[case.shape.cache_dtype]
    return 4 * u * score_mass(case) * max(v.abs().max().item() for v in case.values)


def same_cache(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit under the interpreter; on a GPU a rotated key may be one rounding apart (see
    `rotation_slack`)."""
    if INTERPRETED:
        assert torch.equal(got, expected)
    else:
        ulp = expected.float().abs() * 2 * UNIT_ROUNDOFF[expected.dtype]
        assert ((got.float() - expected.float()).abs() <= ulp).all()


# The new token at the start of a split (129 tokens in 3 splits of 64 keys: it is alone in the
# last one) as well as inside one.
ROPE_DECODE_LENGTHS = [*DECODE_LENGTHS, (128, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_rope_decode_matches_rope_then_decode(shape: Shape) -> None:
    """The decode launch with RoPE and the KV write folded in writes the very cache the
    separate RoPE + KV-write kernel does, and attends, with or without context splits, within
    the bound of exact attention over the rotated q and keys (the new key taken from registers
    by the one program whose split holds it)."""
    case, (q, k, v, cos, sin), written = rope_decode_case(shape, ROPE_DECODE_LENGTHS, seed=9)
    tables, lens, slots = case.attn.block_tables, case.attn.seq_lens_tensor, case.attn.slot_mapping
    for splits in (1, 3):
        cache = case.cache.clone()
        out = rope_paged_decode(q, k, v, cos, sin, cache, slots, tables, lens, None, splits)
        same_cache(cache, written)
        check(out, case, slack=rotation_slack(case))


def test_rope_decode_window_and_padding_rows() -> None:
    """A sliding window, and padding rows (length 0) that give zeros and write nothing."""
    case, (q, k, v, cos, sin), written = rope_decode_case(SHAPES[2], ROPE_DECODE_LENGTHS, seed=10)
    tables, slots = case.attn.block_tables, case.attn.slot_mapping
    for splits in (1, 4):
        cache = case.cache.clone()
        real = rope_paged_decode(
            q, k, v, cos, sin, cache, slots, tables, case.attn.seq_lens_tensor, 7, splits
        )
        check(real, case, 7, rotation_slack(case))
        padded_lens = case.attn.seq_lens_tensor.clone()
        padded_lens[[0, 2]] = 0
        cache = case.cache.clone()
        out = rope_paged_decode(q, k, v, cos, sin, cache, slots, tables, padded_lens, 7, splits)
        assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
        assert torch.equal(out[[1, 3, 4]], real[[1, 3, 4]])
        unwritten = written.clone().view(2, -1, *written.shape[3:])
        unwritten[:, slots[[0, 2]]] = case.cache.view(2, -1, *written.shape[3:])[:, slots[[0, 2]]]
        same_cache(cache, unwritten.view(written.shape))


# A fresh prompt, a chunk continuing after a cached prefix (spanning several query tiles and
# key tiles), and single-token decodes, all in one step.
PREFILL_LENGTHS = [(0, 21), (70, 37), (9, 1), (0, 1), (130, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prefill_matches_reference(shape: Shape) -> None:
    case = make_case(shape, PREFILL_LENGTHS, seed=5)
    attn = case.attn
    starts = torch.tensor([0, *itertools.accumulate(attn.query_lens)], device=DEVICE)
    out = paged_prefill(case.q, case.cache, attn.block_tables, starts, attn.seq_lens_tensor, None)
    check(out, case)


@pytest.mark.parametrize("window", [1, 5, 64])
def test_prefill_sliding_window(window: int) -> None:
    case = make_case(SHAPES[1], PREFILL_LENGTHS, seed=6, write_new=False)
    k, v = case.new_kv()
    out = TritonAttentionBackend(DEVICE).forward(case.q, k, v, case.cache, case.attn, window)
    check(out, case, window)


@pytest.mark.parametrize("window", [None, 50])
def test_backend_matches_torch_backend(window: int | None) -> None:
    """The whole backend (write, then the decode-only or the varlen path) against
    TorchAttentionBackend on the same inputs, both in fp32."""
    for lengths in (DECODE_LENGTHS, PREFILL_LENGTHS):
        case = make_case(SHAPES[4], lengths, seed=7, write_new=False)
        k, v = case.new_kv()
        torch_cache = case.cache.clone()
        out = TritonAttentionBackend(DEVICE).forward(case.q, k, v, case.cache, case.attn, window)
        expected = TorchAttentionBackend().forward(
            case.q, k, v, torch_cache, case.attn, sliding_window=window
        )
        assert torch.equal(case.cache, torch_cache)
        # Each is within the bound of the exact result, so within twice it of each other.
        torch.testing.assert_close(out, expected, atol=2 * tolerance(case), rtol=0)


def test_split_count() -> None:
    assert split_count(batch=1, num_kv_heads=8, context_len=100_000, target_programs=528) == 32
    assert split_count(batch=1, num_kv_heads=8, context_len=1000, target_programs=528) == 4
    assert split_count(batch=256, num_kv_heads=8, context_len=100_000, target_programs=528) == 1
    assert split_count(batch=4, num_kv_heads=8, context_len=4096, target_programs=528) == 16


@pytest.mark.skipif(not INTERPRETED, reason="PagedRunner drives a model on the CPU")
def test_model_forward_matches_torch_backend(tmp_path: Path) -> None:
    """A tiny GQA model with a sliding window, driven like the engine does (prefill, a chunk
    after a cached prefix beside a decode, then decodes), gives the same logits with either
    backend. Both attend in fp32, in different summation orders: each layer's attention output
    differs by a few fp32 roundings (the kernel tests bound it), which two small layers carry to
    the logits at well under 1e-4 of their range, while one wrong or missing key moves them by
    a sizeable fraction of it."""
    hf_model = make_hf_model("mistral-sliding")
    path = str(save_hf_model(hf_model, tmp_path))
    torch_model = load_model(path, "float32", "cpu", kernels="torch")
    triton_model = load_model(path, "float32", "cpu", kernels="triton")
    assert type(torch_model.kernels.attention) is TorchAttentionBackend
    assert type(triton_model.kernels.attention) is TritonAttentionBackend
    steps = [
        [("a", [5, 9, 13, 2, 7, 30, 41]), ("b", [3, 4])],
        [("a", [8, 11, 12]), ("b", [6])],
        [("a", [20]), ("b", [21])],
    ]
    torch_runner = PagedRunner(torch_model, seed=1)
    triton_runner = PagedRunner(triton_model, seed=1)
    with recorded_launches() as launches:
        for step in steps:
            expected = torch_runner.step(step)
            got = triton_runner.step(step)
            for ours, theirs in zip(got, expected, strict=True):
                scale = theirs.abs().max().item()
                torch.testing.assert_close(ours, theirs, atol=1e-4 * scale, rtol=0)
    # the Triton model's attention ran on the Triton kernels: prefill steps, then decodes
    assert {launch.kernel for launch in launches} >= {"_prefill_kernel", "_decode_kernel"}


@pytest.mark.skipif(not INTERPRETED, reason="with CUDA the other tests compile every kernel")
def test_kernels_compile_for_h100_without_spills() -> None:
    """Every variant the backend's warm-up and the layer's pointwise kernels launch, for several
    real models' layouts, built by the real GPU compiler for sm_90 (the interpreter never
    compiles them): none spills registers to local memory or asks for more shared memory than
    an H100 block has."""
    lines = compile_for_sm90("tests.kernels.triton_cuda_compile", timeout=900)
    # 4 layouts x (KV write, decode direct and split, each also with RoPE and the KV write
    # folded in, merge, prefill; RMSNorm plain, with the residual add, on q heads and on k heads;
    # RoPE with and without the KV write; SiLU x up), each distinct variant once: Qwen2.5's
    # RMSNorm on q heads and on k heads are one
    assert len(lines) == 55 and all(line.endswith(" ok") for line in lines), lines
    assert sum("_decode_kernel" in line for line in lines) == 16, lines
    assert sum("_rope_kv_kernel" in line for line in lines) == 8, lines
