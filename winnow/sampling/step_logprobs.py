"""A step's logprob outputs: raw (the model's log_softmax) or processed (after every stage)."""

from __future__ import annotations

import numpy as np
import torch

from winnow.sampling.logprob_ops import floor_logprobs, row_logprobs
from winnow.sampling.step import Step

# Some work rows' processed log-weights: (positions among the rows asked for, a tensor, the
# tensor's rows holding theirs or None where it holds just theirs)
Part = tuple[np.ndarray, torch.Tensor, torch.Tensor | None]


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
        if not inside.any():
            return
        picked = rows[inside]
        parts: list[Part]
        if values is None:
            parts = processed_sources(step, picked)
        else:
            part = values.index_select(0, step.index(np.flatnonzero(inside)))
            parts = [(np.arange(len(picked)), part, None)]
        for positions, source, source_rows in parts:
            index = step.index(picked[positions])
            lse, ids, top = row_logprobs(source, step.top_k_logprobs, source_rows)
            tokens = step.tokens.index_select(0, index)
            if source_rows is None:
                chosen = source.gather(1, tokens[:, None])[:, 0]
            else:
                chosen = source[source_rows, tokens]
            step.lp.index_copy_(0, index, floor_logprobs(chosen - lse))
            if ids is not None and top is not None:
                step.top_ids.index_copy_(0, index, ids)
                step.top_lp.index_copy_(0, index, top)


def processed_values(step: Step, rows: np.ndarray) -> torch.Tensor:
    """[n, V] processed log-weights of the work rows `rows`, from each route's first pass.

    Sampled rows: y = z / T, removed tokens at -inf. Greedy rows: z (temperature 1).
    """
    values = torch.empty((len(rows), step.z.shape[1]), device=step.z.device)
    for positions, source, source_rows in processed_sources(step, rows):
        part = source if source_rows is None else source.index_select(0, source_rows)
        values.index_copy_(0, step.index(positions), part)
    return values


def processed_sources(step: Step, rows: np.ndarray) -> list[Part]:
    """Where the processed log-weights of the work rows `rows` are, route by route. Greedy rows
    and free rows without XTC are read in place, the others built [n, V]."""
    vocab = step.z.shape[1]
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
            parts.append((positions, step.pick.dense(vocab, local), None))
        else:
            assert step.free_y is not None
            if step.free_keep is None:
                parts.append((positions, step.free_y, local))
            else:
                part = step.free_y.index_select(0, local)
                part.masked_fill_(~step.free_keep.index_select(0, local), -torch.inf)
                parts.append((positions, part, None))
    return parts
