"""Stages 3-6 for each route of a step (see sampler.py), plus the thresholded route's fallbacks.

    Sampler.sample(logits, keys)
      |-- all greedy, nothing to apply ------------------> numpy argmax           (no pipeline)
      |-- all temperature-only, CPU kernel --------------> fused Gumbel-max       (no pipeline)
      |-- no truncation, XTC or top_logprobs, CUDA ------> fused Gumbel-max (or argmax) with
      |                                                    stages 1-2, bitmask, logprob
      '-- plan, load (by route; on a CPU without grammar masks only the tokens stages 1-2
          touch: step.Source), penalise, then per route block of rows:
            greedy       argmax of z
            thresholded  top-n slice of z -> truncation, XTC, noise, pick on the slice
                           (CPU, in place: one C pass per row for the slice and bounds on the
                           top_p normaliser, the pick in C; exact normaliser where the bounds
                           keep different tokens)
                           | a row's slice may miss a survivor (flag, one device->host copy)
                           v
                         widen: a slice of >= wide_candidates (4x the first), same stages
                           | still flagged
                           v
                         redo_exact: the whole sorted row, then Gumbel-max over it
            free         Gumbel-max over the whole vocabulary (XTC first if asked)

* greedy: argmax of z.
* thresholded: truncation, XTC, noise and pick on a top-n candidate slice of z.
* free: Gumbel-max over the whole vocabulary, perhaps after XTC.

A slice "overflows" when it might miss a survivor of the whole row; such rows are redone by
`widen` (a wider slice) and then, if still flagged, by `redo_exact` (the whole sorted row).

On a CPU with the C kernels (winnow/kernels/cpu/gumbel_max.c, row_stats.c) the whole-row work
is one vectorised pass per row: Gumbel-max (free rows and redo_exact), or the top-n slice with
the top_p normaliser's bounds (thresholded rows), read from the model's logits with the patched
tokens blended in; rows that need all of z (greedy, XTC without truncation, widen, redo_exact)
are loaded on demand (`load`). They pick what the torch expressions below pick
(tests/sampling/test_gumbel_kernel.py, test_row_stats.py, test_sampler_sourced.py).
On CUDA the free route's Gumbel-max is one Triton pass per row (winnow/kernels/triton/gumbel_max.py,
tests/sampling/test_triton_gumbel.py); elsewhere the torch expressions run. A CUDA step with no
truncation, XTC or top_logprobs skips all of this (Sampler._fused_step): the same kernel takes
greedy rows too, applies stages 1-2 and the grammar bitmask and takes the logprob in its pass.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import numpy as np
import torch

from winnow.kernels.cpu import gumbel_max, row_stats
from winnow.sampling import noise
from winnow.sampling.step import (
    LOGPROBS,
    MIN_P,
    MIN_P_V,
    PROCESSED,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    TOP_P_V,
    XTC,
    XTC_PROB,
    XTC_THRESHOLD,
    Pick,
    RowParams,
    Step,
)
from winnow.sampling.truncation import FLOAT32_MAX, slice_overflows, sorted_survivors, xtc_filter

TOPK_SLACK = 16  # candidates past the largest top_k, so ties at the k-th rarely overflow
OPEN_CANDIDATES = 256  # candidates for rows with top_p / min_p but no top_k
WIDE_CANDIDATES = 4096  # at least this many for flagged rows on their second try


class Routes:
    """Vocabulary-sized resources the routes share: token mixes, noise and scratch buffers."""

    def __init__(
        self,
        vocab_size: int,
        max_rows: int,
        device: torch.device,
        open_candidates: int = OPEN_CANDIDATES,
        wide_candidates: int = WIDE_CANDIDATES,
        triton_gumbel: bool | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.max_rows = max_rows
        self.device = device
        self.open_candidates = open_candidates
        self.wide_candidates = wide_candidates
        self.token_mix = noise.token_mix(torch.arange(vocab_size, device=device))
        self._noise = noise.NoiseScratch(vocab_size, device)
        self._scratch: torch.Tensor | None = None  # [max_rows * V] for whole-row temporaries
        self.triton_gumbel = _triton_gumbel(device, triton_gumbel)
        self.fused_cpu = (
            device.type == "cpu"
            and self.triton_gumbel is None
            and gumbel_max.available()
            and row_stats.available()
        )
        self.mix_table = gumbel_max.mix_table(self.token_mix) if self.fused_cpu else None

    def choose(self, step: Step) -> None:
        """One token per row into step.tokens."""
        if "greedy" in step.routes:
            self._greedy(step, step.routes["greedy"])
        if "thresholded" in step.routes:
            self._thresholded(step, step.routes["thresholded"])
        if "free" in step.routes:
            self._free(step, step.routes["free"])

    def _greedy(self, step: Step, rows: slice) -> None:
        """Argmax of z, ties to the lowest id. Rows read in place with nothing patched whose raw
        top logprobs were taken (step_logprobs.start: the cleaned logits' top-k by value, then
        id) have it as their first top id: when every greedy row has, none is loaded."""
        source, top_ids = step.source, step.top_ids
        if source is not None and top_ids is not None and step.top_k_logprobs:
            flags = step.flags[rows]
            known = flags[:, LOGPROBS] & ~flags[:, PROCESSED]
            if source.patch_ids is not None:
                known &= (source.patch_ids[rows] < 0).all(1).numpy()
            if known.all():
                step.tokens[rows] = top_ids[rows, 0]
                return
        self.load(step, np.arange(rows.start, rows.stop))
        if self.fused_cpu:  # the top-1 pass: argmax with ties to the lower id, vectorised
            step.tokens[rows] = row_stats.top_candidates(step.z[rows], 1)[1][:, 0]
        else:
            torch.argmax(step.z[rows], dim=1, out=step.tokens[rows])

    def widen(self, step: Step, rows: np.ndarray) -> Pick:
        """Second try for the flagged work rows `rows`, on a wider slice; updates the step."""
        assert step.overflow is not None and step.total_mass is not None
        self.load(step, rows)
        index = step.index(rows)
        width = max(self.wide_candidates, 4 * step.width)
        z, total_mass = step.z.index_select(0, index), step.total_mass.index_select(0, index)
        pick = self._pick(self._candidates(z, width), step.params(rows), total_mass)
        step.tokens.index_copy_(0, index, pick.tokens)
        step.overflow.index_copy_(0, index, pick.overflow)
        return pick

    def redo_exact(self, step: Step, rows: np.ndarray) -> torch.Tensor:
        """The thresholded route over whole sorted rows, for the work rows `rows`.

        Updates step.tokens and clears their flags; returns their processed values [n, V].
        """
        self.load(step, rows)
        index = step.index(rows)
        params = step.params(rows)
        flags, floats = params.flags, params.floats
        y = step.z.index_select(0, index).div_(floats[:, TEMPERATURE : TEMPERATURE + 1])
        y.clamp_(max=FLOAT32_MAX)
        ys, order = y.sort(dim=1, descending=True, stable=True)
        keep_sorted = sorted_survivors(
            ys,
            params.top_k,
            floats[:, TOP_P_V] if flags[:, TOP_P].any() else None,
            floats[:, MIN_P_V] if flags[:, MIN_P].any() else None,
        )
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        if flags[:, XTC].any():
            apply = self._xtc_coin(params)
            ids = torch.arange(self.vocab_size, device=self.device)[None, :]
            keep = xtc_filter(y, keep, ids, floats[:, XTC_THRESHOLD], apply)
        keys = noise.row_keys(params.seeds, params.positions, noise.GUMBEL_STREAM)
        values = torch.where(keep, y, -torch.inf)
        # removed = -inf gives the same pick: the row max survives top_k/top_p/min_p
        if self.triton_gumbel is not None and not flags[:, XTC].any():
            ones = torch.ones(len(rows), dtype=torch.float32, device=self.device)
            tokens = self.triton_gumbel.gumbel_argmax(values, params.positions, params.seeds, ones)
        elif self.mix_table is not None and not flags[:, XTC].any():
            ones = torch.ones(len(rows), dtype=torch.float32)
            tokens = gumbel_max.gumbel_argmax(values, ones, keys, self.mix_table)
        else:
            tokens = noise.gumbel_argmax(y, keys, self.token_mix, keep, self._noise)
        step.tokens.index_copy_(0, index, tokens)
        if step.overflow is not None:
            step.overflow.index_fill_(0, index, False)
        return values

    def load(self, step: Step, rows: np.ndarray) -> None:
        """Make z whole for the work rows `rows` where it holds only patched tokens (step.py)."""
        source = step.source
        if source is None or source.loaded[rows].all():
            return
        rows = rows[~source.loaded[rows]]
        start, stop = int(rows[0]), int(rows[-1]) + 1
        if stop - start == len(rows):  # a block of work rows (a route's): loaded where they are
            patch_ids = None if source.patch_ids is None else source.patch_ids[start:stop]
            row_stats.load_rows(source.logits, source.order[start:stop], step.z[start:stop],
                                patch_ids)  # fmt: skip
        else:
            index = torch.from_numpy(rows)
            patch_ids = (
                None if source.patch_ids is None else source.patch_ids.index_select(0, index)
            )
            z = step.z.index_select(0, index)  # the patched values, kept by the load
            row_stats.load_rows(source.logits, source.order.index_select(0, index), z, patch_ids)
            step.z.index_copy_(0, index, z)
        source.loaded[rows] = True

    def _thresholded(self, step: Step, rows: slice) -> None:
        """The thresholded route on its first candidate slice."""
        params = step.params(rows)
        step.width = width = self.first_width(step.top_k_host[rows], params.flags[:, TOP_K])
        if step.source is not None:
            self._thresholded_sourced(step, rows, params, min(width, self.vocab_size))
            return
        candidates = self._candidates(step.z[rows], width)
        step.total_mass = torch.ones_like(step.tokens, dtype=torch.float64)
        if step.mass_rows:  # the route's first rows: top_p without top_k
            mass = slice(rows.start, rows.start + step.mass_rows)
            temperature = step.floats[mass, TEMPERATURE : TEMPERATURE + 1]
            row_max = candidates[0][: step.mass_rows, 0]
            step.total_mass[mass] = self._total_mass(step.z[mass], temperature, row_max)
        pick = self._pick(candidates, params, step.total_mass[rows])
        step.tokens[rows] = pick.tokens
        step.overflow = torch.zeros_like(step.tokens, dtype=torch.bool)
        step.overflow[rows] = pick.overflow
        step.pick = pick

    def first_width(self, top_k: np.ndarray, has_top_k: np.ndarray) -> int:
        """The thresholded route's first slice width for rows with these top_k (host arrays)."""
        width = int(top_k.max()) + TOPK_SLACK if has_top_k.any() else 0
        return width if has_top_k.all() else max(width, self.open_candidates)

    def _thresholded_sourced(self, step: Step, rows: slice, params: RowParams, width: int) -> None:
        """The thresholded route from the model's logits with the C kernels (`pick_sourced`)."""
        source = step.source
        assert source is not None
        mass_rows = torch.arange(rows.stop - rows.start) < step.mass_rows
        processed = params.flags[:, LOGPROBS] & params.flags[:, PROCESSED]
        tokens, overflow, bounds, step.pick = self.pick_sourced(
            source.logits, source.order[rows],
            None if source.patch_ids is None else source.patch_ids[rows], step.z[rows], width,
            slice_rows(params.floats.numpy(), params.top_k.numpy(), params.seeds.numpy(),
                       params.positions.numpy()),
            mass_rows if step.mass_rows else None, want_pick=bool(processed.any()),
        )  # fmt: skip
        step.total_mass = torch.ones_like(step.tokens, dtype=torch.float64)
        step.total_mass[rows] = bounds[:, 0]
        step.tokens[rows] = tokens
        step.overflow = torch.zeros_like(step.tokens, dtype=torch.bool)
        step.overflow[rows] = overflow

    def pick_sourced(
        self,
        logits: torch.Tensor,
        order: torch.Tensor | None,
        patch_ids: torch.Tensor | None,
        patch: torch.Tensor,
        width: int,
        params: np.ndarray,
        mass_rows: torch.Tensor | None,
        *,
        want_pick: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Pick | None]:
        """The thresholded route's pick for rows of the model's logits read as
        row_stats.scan_rows reads them (order, patch_ids, patch [b, V]; params [b] of
        gumbel_max.SLICE_ROW; mass_rows [b] bool: top_p without top_k): one C pass per row for
        the top-`width` candidates and bounds on the top_p normaliser, then the pick on the
        slice. Rows whose bounds keep different tokens, or whose slice overflows (widen reads
        the normaliser), get the exact normaliser and, where undecided, are picked again.
        Returns (tokens, overflow, the normaliser's bounds [b, 2], exact where computed, and
        with `want_pick` the slice and its survivors as `_pick` gives them, for logprobs)."""
        assert self.mix_table is not None
        values, ids, bounds = row_stats.scan_rows(
            logits, order, patch_ids, patch, width, torch.from_numpy(params["temperature"]),
            mass_rows,
        )  # fmt: skip
        params["total_mass"], params["total_mass_hi"] = bounds[:, 0].numpy(), bounds[:, 1].numpy()
        keep = torch.empty(values.shape, dtype=torch.bool) if want_pick else None
        tokens, overflow, undecided = gumbel_max.slice_pick(
            values, ids, params, self.mix_table, keep
        )
        exact = np.zeros(0, dtype=np.int64)
        if mass_rows is not None:
            exact = np.flatnonzero(((undecided | overflow) & mass_rows).numpy())
        if exact.size:
            index = torch.from_numpy(exact)
            mass = row_stats.source_mass(
                logits, order, patch_ids, patch, exact,
                torch.from_numpy(params["temperature"][exact]), values[:, 0].index_select(0, index),
            )  # fmt: skip
            bounds[exact] = mass[:, None].expand(-1, 2)
            params["total_mass"][exact] = params["total_mass_hi"][exact] = mass.numpy()
            kept = None if keep is None else keep.new_empty((exact.size, keep.shape[1]))
            again = gumbel_max.slice_pick(
                values.index_select(0, index), ids.index_select(0, index), params[exact],
                self.mix_table, kept,
            )  # fmt: skip
            tokens[index], overflow[index] = again[0], again[1]
            if keep is not None and kept is not None:
                keep[index] = kept
        if keep is None:
            return tokens, overflow, bounds, None
        temperature = torch.from_numpy(params["temperature"])[:, None]
        ys = (values / temperature).clamp_(max=FLOAT32_MAX)  # `_pick`'s y of the slice
        return tokens, overflow, bounds, Pick(ids, ys, keep, tokens, overflow)

    def _candidates(self, z: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, ids) of the top-`width` slice of the rows `z`, sorted descending."""
        width = min(width, self.vocab_size)
        if self.fused_cpu:
            return row_stats.top_candidates(z, width)
        values, ids = z.topk(width, dim=1)
        return values, ids

    def _pick(
        self,
        candidates: tuple[torch.Tensor, torch.Tensor],
        params: RowParams,
        total_mass: torch.Tensor,
    ) -> Pick:
        """Truncation, XTC, noise and pick on the candidate slice (values, ids) of some rows."""
        flags, floats, top_k = params.flags, params.floats, params.top_k
        values, ids = candidates
        ys = (values / floats[:, TEMPERATURE : TEMPERATURE + 1]).clamp_(max=FLOAT32_MAX)
        keep = sorted_survivors(
            ys,
            top_k,
            floats[:, TOP_P_V] if flags[:, TOP_P].any() else None,
            floats[:, MIN_P_V] if flags[:, MIN_P].any() else None,
            total_mass,
        )
        apply = None
        xtc_zero = torch.zeros_like(top_k, dtype=torch.bool)
        if flags[:, XTC].any():
            apply = self._xtc_coin(params)
            xtc_zero = apply & (floats[:, XTC_THRESHOLD] <= 0)
        overflow = slice_overflows(ys, keep, top_k, xtc_zero, self.vocab_size)
        if apply is not None:
            keep = xtc_filter(ys, keep, ids, floats[:, XTC_THRESHOLD], apply)
        keys = noise.row_keys(params.seeds, params.positions, noise.GUMBEL_STREAM)
        mixed = self.token_mix.index_select(0, ids.view(-1)).view(ids.shape)
        score = ys + noise.gumbel(noise.hash_bits(keys[:, None], mixed))
        score = torch.where(keep, score, -torch.inf)
        best = score.amax(1, keepdim=True)
        tokens = torch.where(keep & (score == best), ids, self.vocab_size).amin(1)
        return Pick(ids, ys, keep, tokens, overflow)

    def _total_mass(
        self,
        z: torch.Tensor,
        temperature: torch.Tensor | float,
        row_max: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sum_j exp(y_j - max y) over whole rows, float64 (y = z / T, computed in scratch).

        row_max: each row's largest z where the caller has it (saves the C kernel a pass)."""
        if self.fused_cpu:
            rows = z.shape[0]
            t = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(temperature)
            return row_stats.total_mass(z, t.to(torch.float32).reshape(-1).expand(rows), row_max)
        if self._scratch is None:
            self._scratch = torch.empty(self.max_rows * self.vocab_size, device=self.device)
        rows = z.shape[0]
        out = self._scratch[: rows * self.vocab_size].view(rows, self.vocab_size)
        y = torch.div(z, temperature, out=out).clamp_(max=FLOAT32_MAX)
        return y.sub_(y.amax(1, keepdim=True)).exp_().sum(1, dtype=torch.float64)

    def _free(self, step: Step, rows: slice) -> None:
        """Rows with no threshold stage: Gumbel-max over the whole vocabulary (maybe after XTC)."""
        params = step.params(rows)
        z = step.z[rows]
        source = step.source
        # processed logprobs read y over the whole row: those rows are loaded
        processed = params.flags[:, LOGPROBS] & params.flags[:, PROCESSED]
        if source is not None and not params.flags[:, XTC].any() and not processed.any():
            assert self.mix_table is not None
            seeds, positions = params.seeds.numpy(), params.positions.numpy()
            keys = torch.from_numpy(noise.row_keys(seeds, positions, noise.GUMBEL_STREAM))
            step.tokens[rows] = gumbel_max.gumbel_argmax(
                source.logits, params.floats[:, TEMPERATURE], keys, self.mix_table,
                order=source.order[rows],
                patch_ids=None if source.patch_ids is None else source.patch_ids[rows],
                patch=z,
            )  # fmt: skip
            step.free_y = None
            return
        self.load(step, np.arange(rows.start, rows.stop))
        if not params.flags[:, XTC].any() and (self.triton_gumbel or self.mix_table is not None):
            # one pass; y is written over z only when processed values will be read
            y_out = z if step.want_y else None
            temperature = params.floats[:, TEMPERATURE]
            if self.triton_gumbel is not None:
                self.triton_gumbel.gumbel_argmax(
                    z, params.positions, params.seeds, temperature, y_out=y_out,
                    tokens=step.tokens[rows],
                )  # fmt: skip
            else:
                assert self.mix_table is not None
                keys = noise.row_keys(params.seeds, params.positions, noise.GUMBEL_STREAM)
                step.tokens[rows] = gumbel_max.gumbel_argmax(
                    z, temperature, keys, self.mix_table, y_out
                )
            step.free_y = y_out
            return
        keys = noise.row_keys(params.seeds, params.positions, noise.GUMBEL_STREAM)
        temperature = params.floats[:, TEMPERATURE : TEMPERATURE + 1]
        y = z.div_(temperature).clamp_(max=FLOAT32_MAX)  # in place: z is not reused
        keep = None
        if params.flags[:, XTC].any():
            lowest = float(step.xtc_threshold[rows][params.flags[:, XTC]].min())
            keep = self._free_xtc(y, params, lowest)
        step.tokens[rows] = noise.gumbel_argmax(y, keys, self.token_mix, keep, self._noise)
        if keep is not None and step.want_y:  # processed values are read from y alone
            y.masked_fill_(~keep, -torch.inf)
        step.free_y = y

    def _free_xtc(self, y: torch.Tensor, params: RowParams, lowest: float) -> torch.Tensor | None:
        """XTC on rows without truncation; `lowest` is their smallest threshold (host value).

        Every token XTC may remove has q >= threshold, so it is among the top 1/threshold
        tokens: the removal is worked out on that slice and written into y as -inf (returns
        None). Threshold 0 can remove any token, so then it returns a whole-row keep mask.
        """
        threshold, apply = params.floats[:, XTC_THRESHOLD], self._xtc_coin(params)
        if lowest <= 0:
            ids = torch.arange(self.vocab_size, device=self.device)[None, :]
            return xtc_filter(y, None, ids, threshold, apply)
        values, ids = y.topk(min(self.vocab_size, int(1.0 / lowest) + 2), dim=1)
        kept = xtc_filter(values, None, ids, threshold, apply, self._total_mass(y, 1.0))
        y.scatter_(1, ids, torch.where(kept, values, -torch.inf))
        return None

    def _xtc_coin(self, params: RowParams) -> torch.Tensor:
        """[b] bool: XTC applies this step (coin from the row's own stream, threshold <= 0.5)."""
        keys = noise.row_keys(params.seeds, params.positions, noise.XTC_STREAM)
        coin = noise.uniform(noise.hash_bits(keys, self.token_mix[0]))
        floats = params.floats
        return (coin < floats[:, XTC_PROB].double()) & (floats[:, XTC_THRESHOLD] <= 0.5)


def slice_rows(
    floats: np.ndarray, top_k: np.ndarray, seeds: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    """The rows' inputs to gumbel_max.slice_pick (its SLICE_ROW records) from their parameter
    table rows (floats [b, NUM_FLOATS]); the normaliser's bounds are filled in later."""
    out = np.empty(len(floats), dtype=gumbel_max.SLICE_ROW)
    for name, column in (
        ("temperature", TEMPERATURE),
        ("top_p", TOP_P_V),
        ("min_p", MIN_P_V),
        ("xtc_probability", XTC_PROB),
        ("xtc_threshold", XTC_THRESHOLD),
    ):
        out[name] = floats[:, column]
    out["top_k"], out["seed"], out["position"] = top_k, seeds, positions
    return out


def _triton_gumbel(device: torch.device, wanted: bool | None) -> ModuleType | None:
    """The Triton Gumbel-max module: on CUDA when triton is importable (None: auto), or where
    asked (True: tests run it on CPU tensors under TRITON_INTERPRET=1)."""
    if wanted is None:
        wanted = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    if not wanted:
        return None
    return importlib.import_module("winnow.kernels.triton.gumbel_max")
