"""Truncation stages (docs/sampling.md step 5) as pure, batched tensor functions.

top_k, top_p and min_p each keep the tokens whose scaled logit y is at or above a per-row
threshold, so they are computed on rows sorted in descending order: either a candidate slice from
torch.topk (the fast path) or a whole sorted row (the exact fallback). XTC then works on any
layout, given the token ids of the columns.
"""

from __future__ import annotations

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max


def sorted_survivors(
    ys: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    total_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep-mask [b, n] of top_k -> top_p -> min_p over rows `ys` sorted in descending order.

    ys: float32, no NaN. top_k: int64 [b], 0 = off (else 1..n). top_p / min_p: float32 [b], or
    None when no row uses the stage (p >= 1 and min_p == 0 are off per row).
    total_mass: [b] float64 sum of exp(y - max y) over the whole vocabulary, the top_p
    normaliser of rows without top_k when `ys` is only a slice; None means the slice is the row.
    The row maximum (all tokens tied with it) always survives. Masses are accumulated in float64,
    so summation order (slice width, batch shape) cannot realistically change a decision.
    """
    n = ys.shape[1]
    row_max = ys[:, :1]
    k_on = (top_k > 0)[:, None]
    kth = ys.gather(1, (top_k.clamp(1, n) - 1)[:, None])
    keep = ys >= torch.where(k_on, kth, -torch.inf)
    if top_p is not None:
        weight = torch.where(keep & (ys > -torch.inf), torch.exp(ys - row_max), 0.0).double()
        mass = weight.sum(1, keepdim=True)
        if total_mass is not None:
            mass = torch.where(k_on, mass, total_mass[:, None])
        cum = (weight / mass).cumsum(1)
        before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
        # Tokens tied in value share "the mass strictly more likely": the value at the group start.
        group_start = torch.ones_like(keep)
        group_start[:, 1:] = ys[:, 1:] != ys[:, :-1]
        above = torch.where(group_start, before, -1.0).cummax(1).values
        p = top_p[:, None]
        keep &= (above < p) | (p >= 1.0)
    if min_p is not None:
        keep &= ys >= row_max + torch.log(min_p)[:, None]
    return keep | (ys == row_max)


def xtc_filter(
    y: torch.Tensor,
    keep: torch.Tensor | None,
    ids: torch.Tensor,
    threshold: torch.Tensor,
    apply: torch.Tensor,
    total_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """XTC: remove every survivor with renormalised q >= threshold except the least likely one.

    y [b, n] float32 (finite or -inf), keep [b, n] (None = all), ids [b, n] or [1, n] token ids of
    the columns, threshold [b], apply [b] bool (coin hit and threshold <= 0.5). Acts only where
    at least two survivors reach the threshold; among equally unlikely ones the highest id stays.
    total_mass: [b] float64 normaliser when the survivors reach past `y` (a top slice of a row
    that holds every token q >= threshold); None: the survivors in `y` are all of them.
    """
    if keep is None:
        keep = torch.ones_like(y, dtype=torch.bool)
    row_max = torch.where(keep, y, -torch.inf).amax(1, keepdim=True)
    weight = torch.where(keep & (y > -torch.inf), torch.exp(y - row_max), 0.0).double()
    mass = weight.sum(1, keepdim=True) if total_mass is None else total_mass[:, None]
    q = weight / mass
    top = keep & (q >= threshold[:, None]) & apply[:, None]
    least = torch.where(top, y, torch.inf).amin(1, keepdim=True)
    keeper = torch.where(top & (y == least), ids, -1).amax(1, keepdim=True)
    remove = top & (ids != keeper) & (top.sum(1, keepdim=True) >= 2)
    return keep & ~remove


def slice_overflows(
    ys: torch.Tensor,
    keep: torch.Tensor,
    top_k: torch.Tensor,
    xtc_zero: torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:
    """[b] bool: the candidate slice `ys` (top-n by value) may miss survivors of the full row.

    Tokens outside the slice are <= its last value. They matter when they could survive: with
    top_k on, when the last value ties the k-th (they would also join the top_p normaliser);
    without top_k, when the last value survived top_p/min_p. Outside -inf tokens only matter
    when the row has no finite value or XTC with threshold 0 (`xtc_zero`) applies.
    """
    if ys.shape[1] >= vocab_size:
        return torch.zeros(ys.shape[0], dtype=torch.bool, device=ys.device)
    last = ys[:, -1]
    n = ys.shape[1]
    kth = ys.gather(1, (top_k.clamp(1, n) - 1)[:, None])[:, 0]
    reaches = torch.where(top_k > 0, last >= kth, keep[:, -1])
    matters = (last > -torch.inf) | (ys[:, 0] == -torch.inf) | xtc_zero
    return reaches & matters
