"""Log-probabilities of full-vocabulary rows, or of a candidate slice's survivors: the sampled
token and the top-k (ties -> lower id)."""

from __future__ import annotations

import torch

from winnow.kernels.cpu import row_stats
from winnow.limits import LOGPROB_FLOOR
from winnow.sampling.step import Pick


def floor_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """-inf (and the NaN of an all -inf row) become LOGPROB_FLOOR, so the result is JSON-safe."""
    return torch.where(torch.isnan(logprobs) | (logprobs == -torch.inf), LOGPROB_FLOOR, logprobs)


def topk_lowest_ids(values: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest values per row, ordered by value desc then id asc.

    torch.topk picks arbitrarily among values tied with the k-th one; here the tied group is
    resolved to its lowest ids with a second top-k over an integer key, so the result is exact.
    """
    rows, vocab = values.shape
    top_values, top_ids = values.topk(k, dim=1)
    kth = top_values[:, k - 1 :]
    above = (top_values > kth).sum(1, keepdim=True)  # every value > kth is inside the top-k
    descending_id = torch.arange(vocab, 0, -1, dtype=torch.int32, device=values.device)
    tie_key = torch.where(values == kth, descending_id, 0)
    tie_ids = vocab - tie_key.topk(k, dim=1).values.to(torch.int64)
    slot = torch.arange(k, device=values.device)
    from_ties = tie_ids.gather(1, (slot - above).clamp(min=0))
    ids = torch.where(slot < above, top_ids, from_ties)
    ids = ids.sort(dim=1, stable=True).values
    order = values.gather(1, ids).sort(dim=1, descending=True, stable=True).indices
    return ids.gather(1, order)


def row_logprobs(
    values: torch.Tensor, k: int, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logsumexp [b], top ids [b, k], top logprobs [b, k]) of unnormalised log-weights `values`
    (no NaN), or of its rows `rows` [b] where given.

    Top entries are None when k == 0. Logprobs are already floored. On a CPU with the C kernels,
    one pass per row in place (row_stats.row_logprobs) instead of a [b, V] logsumexp and top-k.
    """
    cpu_float = values.device.type == "cpu" and values.dtype == torch.float32
    if cpu_float and values.stride(1) == 1 and row_stats.available():
        lse, top_values, ids = row_stats.row_logprobs(values, k, rows)
        if k == 0:
            return lse, None, None
        return lse, ids, floor_logprobs(top_values - lse[:, None])
    if rows is not None:
        values = values.index_select(0, rows)
    lse = torch.logsumexp(values, dim=1)
    if k == 0:
        return lse, None, None
    ids = topk_lowest_ids(values, k)
    top = floor_logprobs(values.gather(1, ids) - lse[:, None])
    return lse, ids, top


def slice_logprobs(
    pick: Pick, k: int, vocab: int, tokens: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(sampled-token logprob [n], top ids [n, k], top logprobs [n, k]) of the distribution the
    candidate slice `pick` (its rows `rows` [n], else all) samples from: its survivors' values,
    every other token -inf; `tokens` [n] the sampled ids. All floored; top entries None when
    k == 0. The same values as `row_logprobs` of `pick.dense`, which on a CPU with the C kernels
    are worked out from the slice alone (row_stats.slice_logprobs); elsewhere the dense rows."""
    if pick.ys.device.type == "cpu" and row_stats.available():
        lse, chosen, values, ids = row_stats.slice_logprobs(
            pick.ys, pick.ids, pick.keep, k, vocab, tokens, rows
        )
        top = floor_logprobs(values - lse[:, None]) if k else None
        return floor_logprobs(chosen - lse), ids if k else None, top
    return dense_logprobs(pick.dense(vocab, rows), k, tokens)


def dense_logprobs(
    values: torch.Tensor, k: int, tokens: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`slice_logprobs` of whole rows: `values` [*, V] log-weights (its rows `rows` [n], else
    all), read in place where `row_logprobs` can."""
    lse, ids, top = row_logprobs(values, k, rows)
    if rows is None:
        rows = torch.arange(len(tokens), device=values.device)
    return floor_logprobs(values[rows, tokens] - lse), ids, top
