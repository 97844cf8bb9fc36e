"""The batched sampler pipeline: docs/sampling.md "Order", applied to a whole batch at once.

Per-row parameters live in persistent per-slot device tensors written once by `add_row`; `sample`
only indexes them with the batch's slots. Which stages run is decided from host-side per-slot
flags, so unused stages cost nothing and a greedy-only batch is a plain argmax.

Each row takes one of three routes, and the rows are grouped by route in the work buffer, so
every route works on a contiguous block of rows (no per-route row gathers). With the CPU kernels
and no grammar masks in the step the logits are not copied there at all: only the tokens stages
1-2 touch are, and the kernels read the rest from the model's logits (step.py):

* greedy (T < 1e-5): argmax of the penalised logits z, ties -> lowest id.
* thresholded (top_k / top_p / min_p): a top-n candidate slice of z (torch.topk, no full sort);
  the stages, the noise and the pick all run on the slice. If the slice might miss a survivor
  (ties at its edge, a nucleus wider than it) the row is flagged in the step's device->host copy
  and redone with a wider slice, then, if still flagged, exactly over its whole sorted row: one
  more copy per extra level, only for steps that need it.
* free (temperature, perhaps XTC): Gumbel-max over the whole vocabulary.

Logprobs: "raw" is log_softmax of the model's logits; "processed" is log_softmax of what the
row samples from (y = z / T with removed tokens at -inf). A greedy row samples from a point mass,
so its processed logprobs use z at temperature 1 instead: penalties, bias and bans applied, no
truncation -- still informative, and what temperature 0 would mean on the other stages. -inf is
reported as -9999.0 in both modes.

Non-finite logits: NaN is treated as -inf and +inf as the largest float32, before any stage.
A row whose survivors are all -inf (every logit NaN, say) returns its lowest surviving id --
token 0 for a row that is entirely NaN/-inf -- and never raises.

Parameters are tensors and the per-row math branches only on host-side flags (no data-dependent
Python control flow inside a route). CUDA-graph capture is not done yet: it needs the
candidate and penalty-history widths bucketed to fixed sizes, with the fallbacks outside.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from winnow.kernels import sampler_edits as fused
from winnow.kernels.cpu import gumbel_max, row_stats
from winnow.sampling import step_logprobs
from winnow.sampling.bitmask import TokenMasks, apply_bitmask, words_for
from winnow.sampling.params import SamplingParams
from winnow.sampling.penalties import PenaltyHistory, flat_index
from winnow.sampling.routes import OPEN_CANDIDATES, WIDE_CANDIDATES, Routes, slice_rows
from winnow.sampling.slot_rows import SlotRows
from winnow.sampling.step import (
    BIAS,
    FREQ_PRES,
    FREQ_V,
    GREEDY,
    LOGPROBS,
    MIN_P,
    MIN_TOKENS,
    NUM_FLAGS,
    NUM_FLOATS,
    PRES_V,
    PROCESSED,
    REP_V,
    REPETITION,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    XTC,
    Source,
    Step,
    Subset,
)

_ROUTES = ("greedy", "thresholded", "free")
# flags that give a greedy row more to do than an argmax of the model's logits
_BEYOND_ARGMAX = [REPETITION, FREQ_PRES, BIAS, LOGPROBS]
# flags that take a row off the plain temperature step (the free route with at most stages 1-2
# before it)
_BEYOND_TEMPERATURE = [GREEDY, TOP_K, TOP_P, MIN_P, XTC, LOGPROBS]
# flags that give a row work the fused CUDA step does not do (set on sampled rows only)
_BEYOND_FUSED = [TOP_K, TOP_P, MIN_P, XTC]
# flags beyond the thresholded route's plain step
_BEYOND_TRUNCATION = [GREEDY, XTC, *_BEYOND_ARGMAX]


@dataclass
class SamplerOutput:
    """One step's result, on the CPU.

    top_* are [B, K] with K = max top_logprobs over the rows asking (capped at the vocabulary),
    sorted by logprob desc, ties -> lower id; entries past a row's own top_logprobs hold -1 / NaN,
    as does `logprobs` for rows that did not ask. All logprob fields are None when no row asked.
    -inf logprobs are reported as -9999.0.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_token_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


class Sampler:
    """Turns a batch of logits plus per-row parameters into one token per row (see module doc).

    `open_candidates` / `wide_candidates` size the thresholded route's first and second
    candidate slices (tuning and tests; results never depend on them). `triton_gumbel`: the
    Triton Gumbel-max for the free route (None: on CUDA; True on a CPU needs TRITON_INTERPRET=1,
    for tests of the CUDA path).
    """

    def __init__(
        self,
        vocab_size: int,
        max_rows: int,
        device: torch.device,
        eos_token_ids: Sequence[int],
        *,
        open_candidates: int = OPEN_CANDIDATES,
        wide_candidates: int = WIDE_CANDIDATES,
        triton_gumbel: bool | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.max_rows = max_rows
        self.device = torch.device(device)
        self._eos = frozenset(int(t) for t in eos_token_ids)
        self._slots: dict[int, int] = {}
        # the last batch's keys and slots: a decode batch often repeats from step to step
        self._last_keys: list[int] | None = None
        self._last_slots = np.zeros(0, dtype=np.int64)
        self._plain: _PlainBatch | None = None  # the plain steps' view of the last batch
        self._free = list(range(max_rows - 1, -1, -1))
        self._flags = np.zeros((max_rows, NUM_FLAGS), dtype=bool)
        self._top_k = np.zeros(max_rows, dtype=np.int64)
        self._xtc_threshold = np.zeros(max_rows, dtype=np.float32)
        self._prompt_len = np.zeros(max_rows, dtype=np.int64)
        self._out_len = np.zeros(max_rows, dtype=np.int64)
        self._min_tokens = np.zeros(max_rows, dtype=np.int64)
        self._num_top_logprobs = np.zeros(max_rows, dtype=np.int64)
        self._floats = torch.zeros((max_rows, NUM_FLOATS), dtype=torch.float32, device=self.device)
        self._seeds_top_k = torch.zeros((max_rows, 2), dtype=torch.int64, device=self.device)
        self._history = PenaltyHistory(max_rows, self.device)
        self._bias_ids = SlotRows(max_rows, torch.int64, -1, self.device)
        self._bias_values = SlotRows(max_rows, torch.float32, 0.0, self.device)
        self._ban_ids = SlotRows(max_rows, torch.int64, -1, self.device)
        # z for the whole batch, plus one trash cell that padded scatters write to
        self._work = torch.empty(max_rows * vocab_size + 1, dtype=torch.float32, device=self.device)
        self._routes = Routes(
            vocab_size, max_rows, self.device, open_candidates, wide_candidates, triton_gumbel
        )
        # the fused CUDA step's per-row marks of the tokens stages 1-2 touched (zero between steps)
        self._touched = None
        if self._routes.triton_gumbel is not None:
            words = words_for(vocab_size)
            self._touched = torch.zeros((max_rows, words), dtype=torch.int32, device=self.device)

    # ------------------------------------------------------------------ rows

    def add_row(
        self,
        key: int,
        params: SamplingParams,
        seed: int,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int] = (),
    ) -> None:
        """Start (or resume, with what it already generated) one sequence under `key`."""
        if key in self._slots:
            raise ValueError(f"sampler row {key} already exists")
        if not self._free:
            raise RuntimeError(f"sampler is full ({self.max_rows} rows)")
        params.check_vocab(self.vocab_size)
        slot = self._free.pop()
        self._slots[key] = slot
        self._last_keys = None
        top_k = params.top_k if 0 < params.top_k < self.vocab_size else 0
        sampled = not params.greedy
        flags = self._flags[slot]
        flags[GREEDY] = params.greedy
        flags[TOP_K] = sampled and top_k > 0
        flags[TOP_P] = sampled and params.top_p < 1.0
        flags[MIN_P] = sampled and params.min_p > 0.0
        flags[XTC] = sampled and params.xtc_probability > 0 and params.xtc_threshold <= 0.5
        flags[REPETITION] = params.repetition_penalty != 1.0
        flags[FREQ_PRES] = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        flags[BIAS] = bool(params.logit_bias)
        ban = sorted(self._eos | set(params.stop_token_ids)) if params.min_tokens else []
        flags[MIN_TOKENS] = bool(ban)
        flags[LOGPROBS] = params.logprobs
        flags[PROCESSED] = params.logprobs_mode == "processed"
        self._top_k[slot] = top_k
        self._xtc_threshold[slot] = params.xtc_threshold
        self._prompt_len[slot] = len(prompt_token_ids)
        self._out_len[slot] = len(output_token_ids)
        self._min_tokens[slot] = params.min_tokens
        self._num_top_logprobs[slot] = params.top_logprobs if params.logprobs else 0
        floats = [
            params.temperature,
            params.top_p,
            params.min_p,
            params.xtc_probability,
            params.xtc_threshold,
            params.repetition_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        ]
        self._floats[slot] = torch.tensor(floats, dtype=torch.float32)
        self._seeds_top_k[slot] = torch.tensor([seed, top_k], dtype=torch.int64)
        if flags[REPETITION] or flags[FREQ_PRES]:
            self._history.reset(slot, prompt_token_ids, output_token_ids)
        self._bias_ids.assign(slot, list(params.logit_bias))
        self._bias_values.assign(slot, list(params.logit_bias.values()))
        self._ban_ids.assign(slot, ban)

    def remove_row(self, key: int) -> None:
        """Forget a finished (or preempted) sequence and free its slot."""
        self._free.append(self._slots.pop(key))
        self._last_keys = None

    def warm_up(self) -> None:
        """Compile every Triton variant this sampler launches (on CUDA) before serving."""
        if self._routes.triton_gumbel is not None:
            warm_up = importlib.import_module("winnow.kernels.triton.warm_up")
            warm_up.warm_up_sampler(self.vocab_size, self.device)

    # ------------------------------------------------------------------ step

    def sample(
        self, logits: torch.Tensor, keys: Sequence[int], bitmasks: TokenMasks | None = None
    ) -> SamplerOutput:
        """One token per row of `logits` [B, V] (rows in `keys` order); advances each row.

        `bitmasks`: grammar bitmasks for some rows (end of stage 2), which win over the min_tokens
        ban: a row's grammar alone decides whether it may end.
        """
        if bitmasks is not None and bitmasks.rows.size == 0:
            bitmasks = None
        slots = self._batch_slots(keys)
        plain = self._plain_argmax(logits, slots) if bitmasks is None else None
        if plain is None and self._routes.triton_gumbel is not None:
            plain = self._fused_step(logits, slots, bitmasks)
        elif plain is None and bitmasks is None:
            plain = self._plain_temperature(logits, slots)
            if plain is None:
                plain = self._plain_truncated(logits, slots)
        if plain is not None:
            return plain
        step = self._prepare(logits, keys, bitmasks, copy=False, slots=slots)
        step.want_y = "processed" in step.subsets
        self._routes.choose(step)
        if step.lp is not None:
            step_logprobs.fill(step, logits, np.arange(len(keys)))
        host = self._download(step)
        overflow = _Columns.overflow
        flagged = np.flatnonzero(host[:, overflow])
        if flagged.size:
            pick = self._routes.widen(step, flagged)
            if step.lp is not None:
                step_logprobs.fill(step, logits, flagged, pick)
            host[flagged] = self._download(step, flagged)
            flagged = flagged[host[flagged, overflow] > 0]
        if flagged.size:
            values = self._routes.redo_exact(step, flagged)
            if step.lp is not None:
                step_logprobs.fill(step, logits, flagged, values)
            host[flagged] = self._download(step, flagged)
        self._record(step)
        return self._output(step, host)

    def processed_logits(
        self, logits: torch.Tensor, keys: Sequence[int], bitmasks: TokenMasks | None = None
    ) -> torch.Tensor:
        """Each row's processed distribution, without advancing any row (tests, debugging).

        Sampled rows: y = z / T with every token the truncation stages removed set to -inf.
        Greedy rows: z itself (penalties, bias and bans at temperature 1), as logprobs use.
        """
        step = self._prepare(logits, keys, bitmasks)
        self._routes.choose(step)
        values = step_logprobs.processed_values(step, np.arange(len(keys)))
        flagged = step.flagged()
        if flagged.size:
            pick = self._routes.widen(step, flagged)
            values[step.index(flagged)] = pick.dense(self.vocab_size)
            flagged = step.flagged()
        if flagged.size:
            values[step.index(flagged)] = self._routes.redo_exact(step, flagged)
        return values.index_select(0, step.index(np.argsort(step.order)))

    def _batch_slots(self, keys: Sequence[int]) -> np.ndarray:
        """The slots of the batch's rows, in batch order (not to be written to); a key twice is
        a ValueError."""
        if isinstance(keys, list) and keys == self._last_keys:
            return self._last_slots
        slots = np.fromiter((self._slots[k] for k in keys), dtype=np.int64, count=len(keys))
        if len(np.unique(slots)) != len(slots):
            raise ValueError("a row appears twice in the batch")
        self._last_keys, self._last_slots = list(keys), slots
        return slots

    def _plain_temperature(self, logits: torch.Tensor, slots: np.ndarray) -> SamplerOutput | None:
        """The OpenAI SDK's default step (temperature only, maybe 1, perhaps with penalties,
        logit_bias or a min_tokens ban) with the fused C kernel on a CPU: every row on the free
        route with nothing but stages 1-2 to apply before it (no XTC or logprobs). The kernel
        reads the model's logits once -- no copy into the work buffer, the touched tokens'
        values computed from the penalty history, bias and ban tables -- and gives the
        pipeline's pick (its NaN and +inf rules included). Anything else -> None, and the full
        pipeline runs."""
        batch = len(slots)
        mix = self._routes.mix_table
        if mix is None or logits.dtype != torch.float32:
            return None
        if logits.shape != (batch, self.vocab_size) or logits.stride(1) != 1:
            return None
        if logits.device.type != self.device.type:
            return None
        plain = self._plain_batch(slots)
        if not plain.temperature:
            return None
        assert plain.seeds is not None and plain.floats is not None
        out_len = self._out_len[slots]
        positions = self._prompt_len[slots] + out_len
        tables = edits = None
        if plain.penalised_slots.size:
            tables = self._history.kernel_view(
                slots, plain.repetition, plain.penalised, plain.floats
            )
        if plain.edited:
            ban_len = self._ban_ids.lengths[slots]
            ban_len = np.where(out_len < self._min_tokens[slots], ban_len, 0)
            edits = gumbel_max.StageTwoTables(
                self._bias_ids.data, self._bias_values.data, self._bias_ids.lengths[slots],
                self._ban_ids.data, ban_len,
            )  # fmt: skip
        temperature = plain.floats[:, TEMPERATURE]
        tokens = gumbel_max.plain_step(
            logits.detach(), plain.seeds, positions, temperature, mix,
            slots=None if tables is None and edits is None else slots, history=tables, edits=edits,
        )  # fmt: skip
        if tables is not None:
            self._history.advance(plain.penalised_slots)
        self._out_len[slots] += 1
        return SamplerOutput(tokens)

    def _plain_truncated(self, logits: torch.Tensor, slots: np.ndarray) -> SamplerOutput | None:
        """Sampled rows with top_k / top_p / min_p and nothing else (no penalty, bias, ban, XTC
        or logprobs) on a CPU with the C kernels: the thresholded route's pass and pick
        (Routes.pick_sourced) on the model's logits, without the pipeline's per-step setup.
        Rows in any other mix, or a row whose slice may miss a survivor (the pipeline widens
        it) -> None, before anything advances, and the full pipeline runs."""
        batch = len(slots)
        if not self._readable(logits) or logits.shape != (batch, self.vocab_size):
            return None
        plain = self._plain_batch(slots)
        if plain.truncated is None or self._banned(plain):
            return None
        params = plain.truncated.params.copy()
        params["position"] = self._prompt_len[slots] + self._out_len[slots]
        patch = self._work[: batch * self.vocab_size].view(batch, self.vocab_size)  # not read
        tokens, overflow, _, _ = self._routes.pick_sourced(
            logits.detach(), None, None, patch, plain.truncated.width, params,
            plain.truncated.mass_rows,
        )  # fmt: skip
        if overflow.any():
            return None
        self._out_len[slots] += 1
        return SamplerOutput(tokens)

    def _plain_batch(self, slots: np.ndarray) -> _PlainBatch:
        """The plain steps' view of the batch `slots` (as `_batch_slots` gave it), kept while the
        batch's rows stay the same: their flags and parameters change only in add_row."""
        if self._plain is not None and self._plain.slots is slots:
            return self._plain
        flags = self._flags[slots]
        penalised = flags[:, REPETITION] | flags[:, FREQ_PRES]
        cpu = self.device.type == "cpu"  # the parameter tables' numpy views, no small torch ops
        truncated = None
        only_truncation = not flags[:, _BEYOND_TRUNCATION].any()
        if cpu and only_truncation and (flags[:, TOP_K] | flags[:, TOP_P] | flags[:, MIN_P]).all():
            truncated = self._truncated_batch(slots, flags)
        self._plain = _PlainBatch(
            slots=slots,
            argmax=bool(flags[:, GREEDY].all() and not flags[:, _BEYOND_ARGMAX].any()),
            temperature=not flags[:, _BEYOND_TEMPERATURE].any(),
            edited=bool((flags[:, BIAS] | flags[:, MIN_TOKENS]).any()),
            ban_rows=np.flatnonzero(flags[:, MIN_TOKENS]),
            penalised=penalised,
            penalised_slots=slots[penalised],
            repetition=flags[:, REPETITION],
            seeds=self._seeds_top_k.numpy()[slots, 0] if cpu else None,
            floats=self._floats.numpy()[slots] if cpu else None,
            truncated=truncated,
        )
        return self._plain

    def _truncated_batch(self, slots: np.ndarray, flags: np.ndarray) -> _TruncatedBatch:
        """`_plain_truncated`'s view of a batch whose rows all truncate (and do nothing else)."""
        seeds, top_k = self._seeds_top_k.numpy()[slots].T
        positions = np.zeros(len(slots), dtype=np.int64)  # each step's own
        mass_rows = flags[:, TOP_P] & ~flags[:, TOP_K]
        return _TruncatedBatch(
            params=slice_rows(self._floats.numpy()[slots], top_k, seeds, positions),
            width=min(
                self._routes.first_width(self._top_k[slots], flags[:, TOP_K]), self.vocab_size
            ),
            mass_rows=torch.from_numpy(mass_rows) if mass_rows.any() else None,
        )

    def _banned(self, plain: _PlainBatch) -> bool:
        """Some row of the batch is still below its min_tokens (its ends are banned)."""
        if not plain.ban_rows.size:
            return False
        slots = plain.slots[plain.ban_rows]
        return bool((self._out_len[slots] < self._min_tokens[slots]).any())

    def _fused_step(
        self, logits: torch.Tensor, slots: np.ndarray, bitmasks: TokenMasks | None
    ) -> SamplerOutput | None:
        """CUDA's step for batches without truncation, XTC or top_logprobs (greedy or sampled
        from the whole vocabulary, with any penalties, logit_bias, min_tokens ban, grammar
        bitmask and logprobs): one upload of the rows' indices, one Triton launch that applies
        stages 1-2 sparsely, picks, takes the logprob and records the penalty history, and one
        download. Anything else -> None, and the full pipeline runs."""
        kernel, batch = self._routes.triton_gumbel, len(slots)
        assert kernel is not None
        if logits.shape != (batch, self.vocab_size) or logits.stride(1) != 1:
            return None
        if logits.device.type != self.device.type:
            return None
        flags = self._flags[slots]
        if flags[:, _BEYOND_FUSED].any() or self._num_top_logprobs[slots].any():
            return None
        info = self._fused_info(slots, flags, bitmasks)
        fields = info[2:]
        penalised = fields[fused.HISTORY] >= 0
        if penalised.any():  # room for the token the kernel records
            self._history.reserve(int(fields[fused.HISTORY].max()) + 1)
        adjust = penalised.any() or fields[fused.BIAS].any() or fields[fused.BAN].any()
        adjust = adjust or (fields[fused.MASK_ROW] >= 0).any() or fields[fused.GREEDY_ROW].any()
        adjust = bool(adjust)
        logprobs = bool(flags[:, LOGPROBS].any())
        # copy=True: the copies a GPU makes are made (and counted) on CPU tensors too
        index = torch.from_numpy(info).to(self.device, non_blocking=True, copy=True)
        out = torch.empty((1 + logprobs, batch), dtype=torch.int64, device=self.device)
        assert self._touched is not None
        history = self._history
        edits = fused.RowEdits(
            index[2:], history.prompt.data, history.output.data, history.counts.data,
            self._bias_ids.data, self._bias_values.data, self._ban_ids.data,
            self._floats[:, REP_V], bitmasks.bits if bitmasks is not None else self._touched,
            self._touched, self._work[: self.max_rows * self.vocab_size].view(self.max_rows, -1),
            adjust=adjust, lp_out=out[1].view(torch.float64) if logprobs else None,
        )  # fmt: skip
        kernel.gumbel_argmax(
            logits.detach(), index[1], self._seeds_top_k[:, 0], self._floats[:, TEMPERATURE],
            slots=index[0], tokens=out[0], edits=edits,
        )  # fmt: skip
        host = out.to("cpu", copy=True).numpy()
        self._out_len[slots] += 1
        self._history.advance(slots[penalised])
        tokens = torch.from_numpy(host[0])
        if not logprobs:
            return SamplerOutput(tokens)
        return SamplerOutput(
            tokens,
            torch.from_numpy(host[1].view(np.float64).astype(np.float32)),
            torch.from_numpy(np.empty((batch, 0), dtype=np.int64)),
            torch.from_numpy(np.empty((batch, 0), dtype=np.float32)),
        )

    def _fused_info(
        self, slots: np.ndarray, flags: np.ndarray, bitmasks: TokenMasks | None
    ) -> np.ndarray:
        """[2 + INFO_FIELDS, b] int64: slots, positions, then RowEdits.info's fields."""
        batch = len(slots)
        out_len = self._out_len[slots]
        mask_row = np.full(batch, -1, dtype=np.int64)
        if bitmasks is not None:
            mask_row[bitmasks.rows] = np.arange(len(bitmasks.rows))
        # a row's grammar alone decides whether it may end
        banned = flags[:, MIN_TOKENS] & (out_len < self._min_tokens[slots]) & (mask_row < 0)
        repetition = flags[:, REPETITION]
        history = self._history.output.lengths[slots]
        info = np.empty((2 + fused.INFO_FIELDS, batch), dtype=np.int64)
        info[0], info[1] = slots, self._prompt_len[slots] + out_len
        info[2 + fused.REP_PROMPT] = np.where(repetition, self._history.prompt.lengths[slots], 0)
        info[2 + fused.REP_OUTPUT] = np.where(repetition, history, 0)
        info[2 + fused.HISTORY] = np.where(repetition | flags[:, FREQ_PRES], history, -1)
        info[2 + fused.BIAS] = self._bias_ids.lengths[slots]
        info[2 + fused.BAN] = np.where(banned, self._ban_ids.lengths[slots], 0)
        info[2 + fused.MASK_ROW] = mask_row
        mode = np.where(flags[:, PROCESSED], fused.PROCESSED_MODE, fused.RAW_MODE)
        info[2 + fused.LOGPROB_MODE] = np.where(flags[:, LOGPROBS], mode, 0)
        info[2 + fused.GREEDY_ROW] = flags[:, GREEDY]
        return info

    def _plain_argmax(self, logits: torch.Tensor, slots: np.ndarray) -> SamplerOutput | None:
        """The common greedy step on a CPU without the pipeline's per-step setup (most of the
        sampler's time at batch 1; BENCHMARKS.md, "C decoder stack"): every row greedy with no
        penalty, bias, ban or logprobs, and every row's maximum finite. Anything else -> None,
        and the full pipeline (which defines NaN and inf rows) runs. numpy's argmax, like the
        greedy route, returns the lowest id among ties."""
        batch = len(slots)
        if logits.device.type != "cpu" or logits.dtype != torch.float32:
            return None
        if logits.shape != (batch, self.vocab_size):
            return None
        plain = self._plain_batch(slots)
        if not plain.argmax or self._banned(plain):
            return None
        rows = logits.detach().numpy()
        tokens = rows.argmax(axis=1)
        if not np.isfinite(rows[np.arange(batch), tokens]).all():
            return None
        self._out_len[slots] += 1
        return SamplerOutput(torch.from_numpy(tokens.astype(np.int64)))

    # ------------------------------------------------------------------ stages 1-2

    def _prepare(
        self,
        logits: torch.Tensor,
        keys: Sequence[int],
        bitmasks: TokenMasks | None = None,
        copy: bool = True,
        slots: np.ndarray | None = None,
    ) -> Step:
        """Plan the step on the host, upload its indices, copy the logits in (by route) and
        apply stages 1-2. copy=False: where the CPU kernels can read the model's logits (no
        bitmask), only the tokens stages 1-2 touch are copied (step.Source)."""
        batch, vocab = len(keys), self.vocab_size
        if logits.dim() != 2 or logits.shape != (batch, vocab):
            raise ValueError(f"logits shape {tuple(logits.shape)} != ({batch}, {vocab})")
        plan = self._plan(self._batch_slots(keys) if slots is None else slots, bitmasks)
        index = self._upload(plan.indices())
        z = self._work[: batch * vocab].view(batch, vocab)
        reordered = np.any(plan.order != np.arange(batch))
        sourced = not copy and bitmasks is None and self._readable(logits)
        if not sourced:
            self._load_logits(logits, z, index["order"] if reordered else None)
        seeds_top_k = self._seeds_top_k.index_select(0, index["slots"])
        step = Step(
            order=plan.order,
            host_slots=plan.host_slots,
            flags=plan.flags,
            z=z,
            slots=index["slots"],
            floats=self._floats.index_select(0, index["slots"]),
            seeds=seeds_top_k[:, 0],
            top_k=seeds_top_k[:, 1],
            positions=index["positions"],
            history_cols=index["history_cols"],
            top_k_host=self._top_k[plan.host_slots],
            xtc_threshold=self._xtc_threshold[plan.host_slots],
            routes=plan.routes,
            subsets={name: Subset(rows, index[name]) for name, rows in plan.subsets.items()},
            tokens=torch.empty(batch, dtype=torch.int64, device=self.device),
            mass_rows=plan.mass_rows,
        )
        if sourced:
            step.source = self._patch(step, logits, index["order"])
        if plan.flags[:, LOGPROBS].any():
            top = int(self._num_top_logprobs[plan.host_slots].max())
            step_logprobs.start(step, min(top, vocab))
        self._penalise(step)
        if bitmasks is not None:  # the end of stage 2: the grammar bitmask
            apply_bitmask(z, index["bitmask_rows"], bitmasks.bits)
        return step

    def _plan(self, batch_slots: np.ndarray, bitmasks: TokenMasks | None) -> _Plan:
        """The step's host-side plan: work-row order by route and which rows need what."""
        batch = len(batch_slots)
        flags = self._flags[batch_slots]
        greedy = flags[:, GREEDY]
        thresholded = ~greedy & (flags[:, TOP_K] | flags[:, TOP_P] | flags[:, MIN_P])
        needs_mass = thresholded & ~flags[:, TOP_K] & flags[:, TOP_P]
        route = np.full(batch, 3, dtype=np.int64)
        route[thresholded] = 2
        route[needs_mass] = 1
        route[greedy] = 0
        order = np.argsort(route, kind="stable")
        host_slots, flags = batch_slots[order], flags[order]
        bounds = np.searchsorted(route[order], [0, 1, 3, 4])
        routes = {
            name: slice(int(start), int(stop))
            for name, start, stop in zip(_ROUTES, bounds[:-1], bounds[1:], strict=True)
            if stop > start
        }
        wants = flags[:, LOGPROBS]
        out_len = self._out_len[host_slots]
        work_row = np.empty(batch, dtype=np.int64)
        work_row[order] = np.arange(batch)
        constrained = np.zeros(batch, dtype=bool)
        bitmask_rows = None
        if bitmasks is not None:
            bitmask_rows = work_row[bitmasks.rows]
            constrained[bitmask_rows] = True
        below_min_tokens = out_len < self._min_tokens[host_slots]
        masks = {
            "penalised": flags[:, REPETITION] | flags[:, FREQ_PRES],
            "bias": flags[:, BIAS],
            "banned": flags[:, MIN_TOKENS] & below_min_tokens & ~constrained,
            "raw": wants & ~flags[:, PROCESSED],
            "processed": wants & flags[:, PROCESSED],
        }
        return _Plan(
            order=order,
            host_slots=host_slots,
            flags=flags,
            routes=routes,
            positions=self._prompt_len[host_slots] + out_len,
            history_cols=self._history.output.lengths[host_slots],
            subsets={name: np.flatnonzero(mask) for name, mask in masks.items() if mask.any()},
            bitmask_rows=bitmask_rows,
            mass_rows=int(needs_mass.sum()),
        )

    def _readable(self, logits: torch.Tensor) -> bool:
        """The CPU kernels can read these logits in place of the work buffer's copy."""
        cpu_float = logits.device.type == "cpu" and logits.dtype == torch.float32
        return self._routes.fused_cpu and cpu_float and logits.stride(1) == 1

    def _patch(self, step: Step, logits: torch.Tensor, order: torch.Tensor) -> Source:
        """The step's Source: each work row's ids that stages 1-2 touch (-1 padded), their
        logits copied into the work buffer for `_penalise` to work on."""
        parts: list[tuple[Subset, torch.Tensor]] = []
        subsets = step.subsets
        if "penalised" in subsets:
            rows = subsets["penalised"]
            slots, host_slots = step.slots.index_select(0, rows.device), step.host_slots[rows.host]
            history = self._history
            if step.flags[rows.host, REPETITION].any():
                parts.append((rows, history.prompt.take(slots, history.prompt.width(host_slots))))
            parts.append((rows, history.output.take(slots, history.output.width(host_slots))))
        for name, table in (("bias", self._bias_ids), ("banned", self._ban_ids)):
            if name in subsets:
                rows = subsets[name]
                slots = step.slots.index_select(0, rows.device)
                parts.append((rows, table.take(slots, table.width(step.host_slots[rows.host]))))
        patch_ids = None
        if parts:
            width = sum(ids.shape[1] for _, ids in parts)
            patch_ids = torch.full((len(step.order), width), -1, dtype=torch.int64)
            start = 0
            for rows, ids in parts:
                patch_ids[:, start : start + ids.shape[1]].index_copy_(0, rows.device, ids)
                start += ids.shape[1]
            stage = None
            if "penalised" in subsets:
                stage = self._history.stage_one(*self._stage_one(step))
            row_stats.seed_patches(logits.detach(), order, step.z, patch_ids, stage)
        loaded = np.zeros(len(step.order), dtype=bool)
        return Source(logits.detach(), order, patch_ids, loaded)

    def _load_logits(
        self, logits: torch.Tensor, z: torch.Tensor, order: torch.Tensor | None
    ) -> None:
        """z = float32(logits) in work-row order; NaN -> -inf, +inf -> float32 max."""
        fused = self._routes.fused_cpu and logits.device.type == "cpu"
        if fused and logits.dtype == torch.float32 and logits.stride(1) == 1:
            row_stats.load_rows(logits.detach(), order, z)
            return
        if order is None and logits.dtype == torch.float32:
            torch.nan_to_num(logits, nan=-torch.inf, neginf=-torch.inf, out=z)
            return
        if order is None:
            z.copy_(logits)
        elif logits.dtype == torch.float32:
            torch.index_select(logits, 0, order, out=z)
        else:
            z.copy_(logits.index_select(0, order))
        z.nan_to_num_(nan=-torch.inf, neginf=-torch.inf)

    def _stage_one(
        self, step: Step
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor | None, torch.Tensor | None]:
        """PenaltyHistory.apply's (rows, slots, host_slots, repetition, frequency_presence)
        for the step's penalised rows."""
        rows = step.subsets["penalised"]
        flags = step.flags[rows.host]
        floats = step.floats.index_select(0, rows.device)
        return (
            rows.device,
            step.slots.index_select(0, rows.device),
            step.host_slots[rows.host],
            floats[:, REP_V] if flags[:, REPETITION].any() else None,
            floats[:, FREQ_V : PRES_V + 1] if flags[:, FREQ_PRES].any() else None,
        )

    def _penalise(self, step: Step) -> None:
        """Stage 1 (penalties; a sourced step's came with its patches) and stage 2 (logit_bias,
        min_tokens bans) on the flat buffer."""
        vocab, z_flat, trash = self.vocab_size, self._work, self._work.shape[0] - 1
        subsets = step.subsets
        if "penalised" in subsets and step.source is None:
            self._history.apply(z_flat, *self._stage_one(step), vocab)
        if "bias" in subsets:
            rows = subsets["bias"]
            slots = step.slots.index_select(0, rows.device)
            width = self._bias_ids.width(step.host_slots[rows.host])
            ids = self._bias_ids.take(slots, width)
            flat = flat_index(rows.device, ids, vocab, trash, ids >= 0)
            z_flat.index_put_((flat,), self._bias_values.take(slots, width), accumulate=True)
        if "banned" in subsets:
            rows = subsets["banned"]
            width = self._ban_ids.width(step.host_slots[rows.host])
            ids = self._ban_ids.take(step.slots.index_select(0, rows.device), width)
            z_flat.index_fill_(
                0, flat_index(rows.device, ids, vocab, trash, ids >= 0).view(-1), -torch.inf
            )

    # ------------------------------------------------------------------ host side

    def _output(self, step: Step, host: np.ndarray) -> SamplerOutput:
        """Unpack the downloaded [B, ...] array (work-row order) into batch order."""
        cols = _Columns(step.top_k_logprobs)
        if step.lp is not None:  # entries past each row's own top_logprobs
            unasked = np.arange(cols.k) >= self._num_top_logprobs[step.host_slots][:, None]
            host[:, cols.top_ids][unasked], host[:, cols.top_lp][unasked] = -1, np.nan
        batch_host = np.empty_like(host)
        batch_host[step.order] = host
        tokens = torch.from_numpy(batch_host[:, cols.token].astype(np.int64))
        if step.lp is None:
            return SamplerOutput(tokens)
        return SamplerOutput(
            tokens,
            torch.from_numpy(batch_host[:, cols.lp].astype(np.float32)),
            torch.from_numpy(batch_host[:, cols.top_ids].astype(np.int64)),
            torch.from_numpy(batch_host[:, cols.top_lp].astype(np.float32)),
        )

    def _download(self, step: Step, rows: np.ndarray | None = None) -> np.ndarray:
        """The step's device->host copy, in work-row order: [n, 2 (+1 + 2K)] float64 laid out
        as `_Columns` says."""
        columns = [step.tokens[:, None]]
        overflow = step.overflow if step.overflow is not None else torch.zeros_like(step.tokens)
        columns.append(overflow[:, None])
        if step.lp is not None and step.top_ids is not None and step.top_lp is not None:
            columns += [step.lp[:, None], step.top_ids, step.top_lp]
        packed = torch.cat([c.double() for c in columns], dim=1)
        if rows is not None:
            packed = packed.index_select(0, step.index(rows))
        return packed.cpu().numpy()

    def _record(self, step: Step) -> None:
        """Advance each row: penalty history (device) and output length (host)."""
        if "penalised" in step.subsets:
            rows = step.subsets["penalised"]
            self._history.record(
                step.slots.index_select(0, rows.device),
                step.host_slots[rows.host],
                step.tokens.index_select(0, rows.device),
                step.history_cols.index_select(0, rows.device),
            )
        self._out_len[step.host_slots] += 1

    def _upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """One host->device copy for all of a step's small index arrays, by name."""
        packed = torch.from_numpy(np.concatenate(list(arrays.values())).astype(np.int64))
        parts = packed.to(self.device, non_blocking=True).split([len(a) for a in arrays.values()])
        return dict(zip(arrays, parts, strict=True))


@dataclass(frozen=True)
class _Columns:
    """Column layout of a step's downloaded array: the token and the thresholded route's
    overflow flag, then, when a row asked for logprobs, the sampled token's logprob and K top
    ids and K top logprobs."""

    k: int  # top logprobs per row
    token = 0
    overflow = 1
    lp = 2

    @property
    def top_ids(self) -> slice:
        return slice(3, 3 + self.k)

    @property
    def top_lp(self) -> slice:
        return slice(3 + self.k, 3 + 2 * self.k)


@dataclass
class _PlainBatch:
    """What the plain steps (`Sampler._plain_argmax`, `_plain_temperature`,
    `_plain_truncated`) read of a batch that only changes with its rows."""

    slots: np.ndarray
    argmax: bool  # every row greedy with nothing but a min_tokens ban to apply
    temperature: bool  # every row sampled from the whole vocabulary after at most stages 1-2
    edited: bool  # some row has a logit_bias or a min_tokens ban
    ban_rows: np.ndarray  # rows with a min_tokens ban (active while below min_tokens)
    penalised: np.ndarray  # [b] bool: rows with a penalty
    penalised_slots: np.ndarray  # their slots
    repetition: np.ndarray  # [b] bool: rows with a repetition penalty
    seeds: np.ndarray | None  # [b] (None: the parameter tables are not on the CPU)
    floats: np.ndarray | None  # [b, NUM_FLOATS]
    truncated: _TruncatedBatch | None  # rows all with top_k / top_p / min_p only, on a CPU


@dataclass
class _TruncatedBatch:
    """What `Sampler._plain_truncated` reads of a batch that only changes with its rows."""

    params: np.ndarray  # [b] gumbel_max.SLICE_ROW, positions and normaliser bounds not filled
    width: int  # the scan's slice width
    mass_rows: torch.Tensor | None  # [b] bool: top_p without top_k (None: no row)


@dataclass
class _Plan:
    """A step's host-side plan, in work-row order (rows grouped by route)."""

    order: np.ndarray  # work row i holds batch row order[i]
    host_slots: np.ndarray
    flags: np.ndarray
    routes: dict[str, slice]
    positions: np.ndarray  # absolute position of the token being sampled
    history_cols: np.ndarray
    subsets: dict[str, np.ndarray]  # "penalised" / "bias" / ... -> work rows (non-empty only)
    bitmask_rows: np.ndarray | None  # the work rows of the grammar bitmasks' rows
    mass_rows: int

    def indices(self) -> dict[str, np.ndarray]:
        """Everything the device needs from the plan, by name (subsets under their own)."""
        arrays = {
            "slots": self.host_slots,
            "positions": self.positions,
            "history_cols": self.history_cols,
            "order": self.order,
            **self.subsets,
        }
        if self.bitmask_rows is not None:
            arrays["bitmask_rows"] = self.bitmask_rows
        return arrays
