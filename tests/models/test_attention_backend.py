"""TorchAttentionBackend against a naive per-token attention over the full key history."""

from __future__ import annotations

import math
import random

import pytest
import torch

from winnow.kernels.torch_attention import TorchAttentionBackend
from winnow.models import AttentionMetadata

HQ, HKV, D, BLOCK, NUM_BLOCKS = 6, 2, 8, 4, 40


def naive_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int, window: int | None
) -> torch.Tensor:
    """One query [HQ, D] at absolute position `pos` over keys/values [L, HKV, D]."""
    lo = 0 if window is None else max(0, pos - window + 1)
    k = keys[lo : pos + 1].repeat_interleave(HQ // HKV, dim=1)  # [n, HQ, D]
    v = values[lo : pos + 1].repeat_interleave(HQ // HKV, dim=1)
    scores = torch.einsum("hd,nhd->hn", q, k) / math.sqrt(D)
    return torch.einsum("hn,nhd->hd", scores.softmax(-1), v)


def run_case(
    cases: list[tuple[int, int]], window: int | None = None, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cases: (tokens already cached, new tokens) per sequence -> (backend output, expected)."""
    gen = torch.Generator().manual_seed(seed)
    # Garbage in unused blocks must never leak into the result.
    cache = torch.randn(2, NUM_BLOCKS, BLOCK, HKV, D, generator=gen) * 100
    free = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(free)
    histories, tables = [], []
    for cached, new in cases:
        total = cached + new
        keys = torch.randn(total, HKV, D, generator=gen)
        values = torch.randn(total, HKV, D, generator=gen)
        table = [free.pop() for _ in range(-(-total // BLOCK))]
        for p in range(cached):
            cache[0, table[p // BLOCK], p % BLOCK] = keys[p]
            cache[1, table[p // BLOCK], p % BLOCK] = values[p]
        histories.append((keys, values))
        tables.append(table)
    attn = AttentionMetadata.build(
        [n for _, n in cases], [c + n for c, n in cases], tables, BLOCK, device=device
    )
    q = torch.randn(sum(n for _, n in cases), HQ, D, generator=gen)
    k = torch.cat([keys[c:] for (keys, _), (c, _) in zip(histories, cases, strict=True)])
    v = torch.cat([vals[c:] for (_, vals), (c, _) in zip(histories, cases, strict=True)])
    backend = TorchAttentionBackend()
    dev = [t.to(device) for t in (q, k, v, cache)]
    out = backend.forward(*dev, attn, sliding_window=window).cpu()

    expected = torch.empty_like(q)
    row = 0
    for (keys, values), (cached, new) in zip(histories, cases, strict=True):
        for i in range(new):
            expected[row] = naive_attention(q[row], keys, values, cached + i, window)
            row += 1
    return out, expected


@pytest.mark.parametrize(
    "cases",
    [
        [(0, 9)],  # one fresh prefill
        [(5, 1), (12, 1), (0, 1), (3, 1)],  # decode only (incl. a 1-token prompt)
        [(7, 1), (7, 1), (7, 1)],  # decode only, equal lengths (no length mask needed)
        [(7, 5)],  # chunked prefill continuing after cached tokens
        [(6, 1), (0, 7), (9, 6), (2, 1), (0, 1), (4, 4)],  # everything at once
    ],
)
@pytest.mark.parametrize("window", [None, 3])
def test_matches_naive_attention(cases: list[tuple[int, int]], window: int | None) -> None:
    out, expected = run_case(cases, window)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_new_keys_and_values_land_in_their_slots() -> None:
    gen = torch.Generator().manual_seed(1)
    cache = torch.zeros(2, NUM_BLOCKS, BLOCK, HKV, D)
    attn = AttentionMetadata.build([2, 5], [5, 5], [[7, 2], [30, 11]], BLOCK)
    k, v, q = (torch.randn(7, h, D, generator=gen) for h in (HKV, HKV, HQ))
    TorchAttentionBackend().forward(q, k, v, cache, attn)
    flat_k = cache[0].view(-1, HKV, D)
    flat_v = cache[1].view(-1, HKV, D)
    assert torch.equal(flat_k[attn.slot_mapping], k)
    assert torch.equal(flat_v[attn.slot_mapping], v)
    assert attn.slot_mapping.tolist() == [7 * 4 + 3, 2 * 4 + 0, 120, 121, 122, 123, 44]


def test_metadata_build() -> None:
    attn = AttentionMetadata.build([3, 1], [3, 6], [[4], [9, 1]], 4)
    assert attn.block_tables.tolist() == [[4, 0], [9, 1]]
    assert attn.seq_lens_tensor.tolist() == [3, 6]
    assert attn.slot_mapping.tolist() == [16, 17, 18, 5]
    assert not attn.is_decode_only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 3])
def test_cuda_matches_naive_attention(window: int | None) -> None:
    out, expected = run_case([(6, 1), (0, 7), (9, 6), (2, 1)], window, device="cuda")
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
