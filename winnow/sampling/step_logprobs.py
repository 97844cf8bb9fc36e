"""A step's logprob outputs: raw (the model's log_softmax) or processed (after every stage)."""

from __future__ import annotations

import numpy as np
import torch

from winnow.sampling.logprob_ops import floor_logprobs, row_logprobs
from winnow.sampling.step import Step


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
    values = step.z if len(rows.host) == batch else step.z.index_select(0, rows.device)
    lse, ids, top = row_logprobs(values, k)
    step.raw_lse = torch.zeros(batch, device=device).index_copy_(0, rows.device, lse)
    if ids is not None and top is not None:
        step.top_ids.index_copy_(0, rows.device, ids)
        step.top_lp.index_copy_(0, rows.device, top)


def fill(
    step: Step, logits: torch.Tensor, rows: np.ndarray, values: torch.Tensor | None = None
) -> None:
    """Sampled-token logprob (both modes) and processed top-k of the work rows `rows`.

    `values`: the processed values of `rows` when the caller already has them (fallbacks).
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
        if inside.any():
            index = step.index(rows[inside])
            if values is None:
                part = processed_values(step, rows[inside])
            else:
                part = values.index_select(0, step.index(np.flatnonzero(inside)))
            lse, ids, top = row_logprobs(part, step.top_k_logprobs)
            chosen = part.gather(1, step.tokens.index_select(0, index)[:, None])[:, 0]
            step.lp.index_copy_(0, index, floor_logprobs(chosen - lse))
            if ids is not None and top is not None:
                step.top_ids.index_copy_(0, index, ids)
                step.top_lp.index_copy_(0, index, top)


def processed_values(step: Step, rows: np.ndarray) -> torch.Tensor:
    """[n, V] processed log-weights of the work rows `rows`, from each route's first pass.

    Sampled rows: y = z / T, removed tokens at -inf. Greedy rows: z (temperature 1).
    """
    vocab = step.z.shape[1]
    values = torch.empty((len(rows), vocab), device=step.z.device)
    for name, span in step.routes.items():
        inside = (rows >= span.start) & (rows < span.stop)
        if not inside.any():
            continue
        local = step.index(rows[inside] - span.start)
        if name == "greedy":
            part = step.z[span].index_select(0, local)
        elif name == "thresholded":
            assert step.pick is not None
            part = step.pick.dense(vocab, local)
        else:
            assert step.free_y is not None
            part = step.free_y.index_select(0, local)
            if step.free_keep is not None:
                part.masked_fill_(~step.free_keep.index_select(0, local), -torch.inf)
        values.index_copy_(0, step.index(np.flatnonzero(inside)), part)
    return values
