"""One sampling step's shared state: the host plan, per-row tensors and each route's results.

Rows are reordered by route when the logits are loaded, so row i of every per-row array is
"work row" i, which holds batch row `Step.order[i]`.

With the CPU kernels and no grammar masks the logits are not copied: the work buffer holds only
each row's patched tokens (`Source`), the kernels read the model's logits with those values
blended in, and the rows that need all of z (greedy, XTC without truncation, free rows with
processed logprobs, the fallbacks) are loaded on demand. Raw logprobs read the model's logits
(and give an unpatched greedy row its token); a thresholded row's processed logprobs read its
candidate slice and survivors (`Pick`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# host-side per-slot flags (columns of the sampler's flag table)
GREEDY, TOP_K, TOP_P, MIN_P, XTC, REPETITION, FREQ_PRES = range(7)
BIAS, MIN_TOKENS, LOGPROBS, PROCESSED = range(7, 11)
NUM_FLAGS = 11
# per-slot float parameters (columns of the sampler's parameter table)
TEMPERATURE, TOP_P_V, MIN_P_V, XTC_PROB, XTC_THRESHOLD, REP_V, FREQ_V, PRES_V = range(8)
NUM_FLOATS = 8


def device_index(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host index array as an int64 device tensor (asynchronous host->device copy)."""
    array = np.ascontiguousarray(host, dtype=np.int64)
    return torch.from_numpy(array).to(device, non_blocking=True)


@dataclass
class Subset:
    """Some work rows, on the host and on the device."""

    host: np.ndarray
    device: torch.Tensor


@dataclass
class RowParams:
    """The inputs of some work rows: host flags and slots, device parameters."""

    flags: np.ndarray
    host_slots: np.ndarray
    floats: torch.Tensor
    top_k: torch.Tensor
    seeds: torch.Tensor
    positions: torch.Tensor


@dataclass
class Pick:
    """The thresholded route's result on a candidate slice (ids sorted by value, descending)."""

    ids: torch.Tensor
    ys: torch.Tensor
    keep: torch.Tensor
    tokens: torch.Tensor
    overflow: torch.Tensor

    def dense(self, vocab_size: int, local: torch.Tensor | None = None) -> torch.Tensor:
        """[n, V] processed values of (the rows `local` of) the slice; -inf off the slice."""
        ids, kept = self.ids, torch.where(self.keep, self.ys, -torch.inf)
        if local is not None:
            ids, kept = ids.index_select(0, local), kept.index_select(0, local)
        values = torch.full((ids.shape[0], vocab_size), -torch.inf, device=ids.device)
        return values.scatter_(1, ids, kept)


@dataclass
class Source:
    """Where the CPU kernels read a step's rows: work row r is logits[order[r]] (cleaned on the
    fly), except the tokens patch_ids[r] (-1: padding; None: no row has any), whose values are
    the work buffer's (penalties, logit_bias, bans). `loaded[r]`: z[r] is complete."""

    logits: torch.Tensor
    order: torch.Tensor
    patch_ids: torch.Tensor | None
    loaded: np.ndarray


@dataclass
class Step:
    """Everything one `Sampler.sample` call computes, shared by its phases."""

    order: np.ndarray
    host_slots: np.ndarray
    flags: np.ndarray  # [B, NUM_FLAGS] bool
    z: torch.Tensor  # [B, V] view of the work buffer: penalised, biased, banned logits
    slots: torch.Tensor
    floats: torch.Tensor  # [B, NUM_FLOATS]
    seeds: torch.Tensor
    top_k: torch.Tensor
    positions: torch.Tensor  # absolute position of the token being sampled
    history_cols: torch.Tensor  # where each row records its token in the penalty history
    top_k_host: np.ndarray  # per work row, host copies of what plans a route's shapes
    xtc_threshold: np.ndarray
    routes: dict[str, slice]  # "greedy" / "thresholded" / "free" -> contiguous work rows
    subsets: dict[str, Subset]  # "penalised" / "bias" / "banned" / "raw" / "processed"
    tokens: torch.Tensor
    mass_rows: int  # leading thresholded rows that need the whole-vocabulary top_p normaliser
    overflow: torch.Tensor | None = None  # [B] bool: thresholded rows to redo on a wider slice
    total_mass: torch.Tensor | None = None  # [B] float64 top_p normaliser (mass rows; else 1)
    width: int = 0  # candidate slice width of the thresholded route
    pick: Pick | None = None  # the thresholded route's slice
    want_y: bool = True  # processed values will be read: the free route keeps y (else z)
    free_y: torch.Tensor | None = None  # the free rows' processed values (in the work buffer)
    source: Source | None = None  # set when z holds only patched tokens (see module doc)
    raw_lse: torch.Tensor | None = None  # [B] logsumexp of the raw logits
    top_k_logprobs: int = 0
    lp: torch.Tensor | None = None  # [B] sampled-token logprob
    top_ids: torch.Tensor | None = None  # [B, K]
    top_lp: torch.Tensor | None = None

    def index(self, host: np.ndarray) -> torch.Tensor:
        return device_index(host, self.tokens.device)

    def params(self, rows: slice | np.ndarray) -> RowParams:
        """The inputs of work rows `rows`: views for a slice, copies for an index array."""
        per_row = (self.floats, self.top_k, self.seeds, self.positions)
        if isinstance(rows, slice):
            tensors = [t[rows] for t in per_row]
        else:
            index = self.index(rows)
            tensors = [t.index_select(0, index) for t in per_row]
        return RowParams(self.flags[rows], self.host_slots[rows], *tensors)

    def flagged(self) -> np.ndarray:
        """Work rows whose candidate slice may miss survivors (a device->host sync)."""
        if self.overflow is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.overflow.cpu().numpy())
