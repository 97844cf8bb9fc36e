"""The thresholded route's C row helpers against torch: top-n candidates and the top_p mass."""

from __future__ import annotations

import pytest
import torch

from winnow.kernels.cpu import row_stats

pytestmark = pytest.mark.skipif(not row_stats.available(), reason="no AVX2 C kernels here")


@pytest.mark.parametrize("vocab", [131072, 1003, 9])
def test_top_candidates_are_torch_topk_values_with_valid_ids(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    z = torch.randn(12, vocab, generator=generator) * 3
    z[1] = torch.randint(0, 4, (vocab,), generator=generator).float()  # ties everywhere
    z[2, : vocab // 2] = -torch.inf
    z[3] = -torch.inf
    z[4] = torch.arange(vocab, dtype=torch.float32)  # rising: the threshold moves every step
    for n in sorted({1, 2, min(50, vocab), min(256, vocab), vocab // 2 + 1, vocab}):
        values, ids = row_stats.top_candidates(z, n)
        assert torch.equal(values, z.topk(n, dim=1).values)
        assert torch.equal(z.gather(1, ids), values)
        assert all(len(set(row.tolist())) == n for row in ids)
        tied = values[:, 1:] == values[:, :-1]  # ties ordered by id
        assert bool((ids[:, 1:] > ids[:, :-1])[tied].all())


def test_total_mass_matches_torch() -> None:
    """Float32 exps within ~2 ulp of torch's, summed in float64: relative error well under 1e-6
    (a top_p decision would need its cumulative mass that close to p to notice)."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(16, 32771, generator=generator) * 4
    z[1, ::3] = -torch.inf
    z[2, 5] = torch.finfo(torch.float32).max
    temperature = torch.rand(16, generator=generator) + 0.2
    y = (z / temperature[:, None]).clamp(max=torch.finfo(torch.float32).max)
    expected = (y - y.amax(1, keepdim=True)).exp().sum(1, dtype=torch.float64)
    torch.testing.assert_close(row_stats.total_mass(z, temperature), expected, rtol=1e-6, atol=0)


def test_load_rows_reorders_and_cleans() -> None:
    logits = torch.randn(5, 1001, generator=torch.Generator().manual_seed(2))
    logits[1, 3], logits[2, 4], logits[3, 5] = float("nan"), float("inf"), -float("inf")
    order = torch.tensor([3, 1, 4, 2])
    z = torch.empty(4, 1001)
    row_stats.load_rows(logits, order, z)
    expected = logits[order].nan_to_num(nan=-torch.inf, neginf=-torch.inf)
    assert torch.equal(z, expected)
    row_stats.load_rows(logits[:4], None, z)
    assert torch.equal(z, logits[:4].nan_to_num(nan=-torch.inf, neginf=-torch.inf))
