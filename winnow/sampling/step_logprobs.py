"""A step's logprob outputs: raw (the model's log_softmax) or processed (after every stage)."""

from __future__ import annotations

import numpy as np
import torch

from winnow.sampling.logprob_ops import (
    dense_logprobs,
    floor_logprobs,
    row_logprobs,
    slice_logprobs,
)
from winnow.sampling.step import Pick, Step

# Some work rows' processed log-weights: (positions among the rows asked for, dense rows [*, V]
# or a candidate slice, the rows of it holding theirs or None where it holds just theirs)
Part = tuple[np.ndarray, torch.Tensor | Pick, torch.Tensor | None]


def start(step: Step, k: int) -> None:
    """Create the outputs, and take the raw top-k from z before stage 1 touches it."""
    batch, device = len(step.order), step.tokens.device
    step.top_k_logprobs = k
    step.lp = torch.full((batch,), torch.nan, device=device)
    step.top_ids = torch.full((batch, k), -1, dtype=torch.int64, device=device)
    step.top_lp = torch.full((batch, k), torch.nan, device=device)
    if "raw" not in step.subsets:
        return
    rows = step.subsets["raw"]
    lse, ids, top = row_logprobs(step.z, k, None if len(rows.host) == batch else rows.device)
    step.raw_lse = torch.zeros(batch, device=device).index_copy_(0, rows.device, lse)
    if ids is not None and top is not None:
        step.top_ids.index_copy_(0, rows.device, ids)
        step.top_lp.index_copy_(0, rows.device, top)


def fill(
    step: Step, logits: torch.Tensor, rows: np.ndarray, redone: torch.Tensor | Pick | None = None
) -> None:
    """Sampled-token logprob (both modes) and processed top-k of the work rows `rows`.

    `redone`: what the fallbacks sampled `rows` from (a wider slice, or whole rows [n, V]).
    """
    assert step.lp is not None and step.top_ids is not None and step.top_lp is not None
    if "raw" in step.subsets and step.raw_lse is not None:
        inside = np.isin(rows, step.subsets["raw"].host)
        if inside.any():
            index = step.index(rows[inside])
            batch_rows = step.index(step.order[rows[inside]])
            raw = logits[batch_rows, step.tokens.index_select(0, index)].float()
            raw = torch.nan_to_num(raw, nan=-torch.inf, neginf=-torch.inf)
            step.lp.index_copy_(0, index, floor_logprobs(raw - step.raw_lse.index_select(0, index)))
    if "processed" in step.subsets:
        inside = np.isin(rows, step.subsets["processed"].host)
        if not inside.any():
            return
        picked = rows[inside]
        parts: list[Part]
        if redone is None:
            parts = processed_sources(step, picked)
        else:
            parts = [(np.arange(len(picked)), redone, step.index(np.flatnonzero(inside)))]
        k, vocab = step.top_k_logprobs, step.z.shape[1]
        for positions, source, source_rows in parts:
            index = step.index(picked[positions])
            tokens = step.tokens.index_select(0, index)
            if isinstance(source, Pick):
                lp, ids, top = slice_logprobs(source, k, vocab, tokens, source_rows)
            else:
                lp, ids, top = dense_logprobs(source, k, tokens, source_rows)
            step.lp.index_copy_(0, index, lp)
            if ids is not None and top is not None:
                step.top_ids.index_copy_(0, index, ids)
                step.top_lp.index_copy_(0, index, top)


def processed_values(step: Step, rows: np.ndarray) -> torch.Tensor:
    """[n, V] processed log-weights of the work rows `rows`, from each route's first pass.

    Sampled rows: y = z / T, removed tokens at -inf. Greedy rows: z (temperature 1).
    """
    vocab = step.z.shape[1]
    values = torch.empty((len(rows), vocab), device=step.z.device)
    for positions, source, source_rows in processed_sources(step, rows):
        if isinstance(source, Pick):
            part = source.dense(vocab, source_rows)
        else:
            part = source if source_rows is None else source.index_select(0, source_rows)
        values.index_copy_(0, step.index(positions), part)
    return values


def processed_sources(step: Step, rows: np.ndarray) -> list[Part]:
    """Where the processed log-weights of the work rows `rows` are, route by route: greedy and
    free rows in place, thresholded rows as their candidate slice (nothing [n, V])."""
    parts: list[Part] = []
    for name, span in step.routes.items():
        inside = (rows >= span.start) & (rows < span.stop)
        if not inside.any():
            continue
        positions, local = np.flatnonzero(inside), step.index(rows[inside] - span.start)
        if name == "greedy":
            parts.append((positions, step.z[span], local))
        elif name == "thresholded":
            assert step.pick is not None
            parts.append((positions, step.pick, local))
        else:
            assert step.free_y is not None
            parts.append((positions, step.free_y, local))
    return parts
