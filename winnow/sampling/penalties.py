"""Sparse, device-resident token history for repetition / frequency / presence penalties.

Only tokens a row has seen are touched, so a step costs O(batch x history), not O(batch x vocab).
Logit updates go through a flat view of the logits buffer whose last element is a trash cell:
padding entries point there, so every gather/scatter has a fixed shape and no masking branch.
They use index_select / index_copy_ (torch's advanced indexing on a CPU tensor this large costs
a pass over the whole buffer per call); on a CPU with the C kernels `apply` is one C call
(`row_stats.penalise`) with the same float32 operations. Rows whose only stages before the
Gumbel pick are penalties, logit_bias and the min_tokens ban skip the buffer altogether: the
sampler's one-call C step reads these tables itself (`kernel_view`), with the same operations
again, and records the token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from winnow.kernels.cpu import gumbel_max, row_stats
from winnow.sampling.slot_rows import SlotRows
from winnow.sampling.step import PRES_V, REP_V


def flat_index(
    rows: torch.Tensor, ids: torch.Tensor, vocab_size: int, trash: int, valid: torch.Tensor
) -> torch.Tensor:
    """Flat positions rows*V + ids into the [B*V + trash] buffer; invalid entries -> trash."""
    return torch.where(valid, rows[:, None] * vocab_size + ids, trash)


class PenaltyHistory:
    """Per slot: the distinct prompt ids, every output id in order, and per distinct output id its
    count, stored at its first occurrence (0 elsewhere) so each token is penalised once."""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.prompt = SlotRows(slots, torch.int64, -1, device)
        self.output = SlotRows(slots, torch.int64, -1, device)
        self.counts = SlotRows(slots, torch.int32, 0, device)

    def reset(self, slot: int, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        """Load a row's history (also a preempted row's, so it resumes exactly)."""
        outputs = np.asarray(output_ids, dtype=np.int64)
        counts = np.zeros(len(outputs), dtype=np.int32)
        distinct, first, occurrences = np.unique(outputs, return_index=True, return_counts=True)
        counts[first] = occurrences
        self.prompt.assign(slot, np.unique(np.asarray(prompt_ids, dtype=np.int64)))
        self.output.assign(slot, outputs)
        self.counts.assign(slot, counts)

    def apply(
        self,
        z_flat: torch.Tensor,
        rows: torch.Tensor,
        slots: torch.Tensor,
        host_slots: np.ndarray,
        repetition: torch.Tensor | None,
        frequency_presence: torch.Tensor | None,
        vocab_size: int,
    ) -> None:
        """Penalise batch `rows` (slots `slots`) of the flat logits buffer in place.

        repetition [b] (None: no row uses it) is applied first, on the model's own logits;
        frequency_presence [b, 2] (None: no row uses them) then, with the exact OpenAI formula.
        """
        if z_flat.device.type == "cpu" and row_stats.available():  # one C call, same values
            stage = self.stage_one(rows, slots, host_slots, repetition, frequency_presence)
            row_stats.penalise(z_flat, vocab_size, stage)
            return
        trash = z_flat.shape[0] - 1
        out_width = self.output.width(host_slots)
        outputs = self.output.take(slots, out_width)
        if repetition is not None:
            ids = torch.cat([self.prompt.take(slots, self.prompt.width(host_slots)), outputs], 1)
            flat = flat_index(rows, ids, vocab_size, trash, ids >= 0).view(-1)
            z = z_flat.index_select(0, flat).view(ids.shape)
            r = repetition[:, None]
            # duplicate ids write identical values, so the scatter is deterministic
            z_flat.index_copy_(0, flat, torch.where(z > 0, z / r, z * r).view(-1))
        if frequency_presence is not None and out_width:
            counts = self.counts.take(slots, out_width)
            flat = flat_index(rows, outputs, vocab_size, trash, counts > 0).view(-1)
            c = counts.to(torch.float32)
            frequency, presence = frequency_presence[:, :1], frequency_presence[:, 1:]
            z = z_flat.index_select(0, flat).view(counts.shape)
            z_flat.index_copy_(0, flat, (z - c * frequency - (c > 0) * presence).view(-1))

    def stage_one(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        host_slots: np.ndarray,
        repetition: torch.Tensor | None,
        frequency_presence: torch.Tensor | None,
    ) -> row_stats.StageOne:
        """`apply`'s arguments as the C kernels take them (CPU tables)."""
        out_width = self.output.width(host_slots)
        prompt = None
        if repetition is not None:
            prompt = self.prompt.take(slots, self.prompt.width(host_slots))
        counts = self.counts.take(slots, out_width) if frequency_presence is not None else None
        outputs = self.output.take(slots, out_width)
        return row_stats.StageOne(rows, prompt, outputs, counts, repetition, frequency_presence)

    def kernel_view(
        self,
        host_slots: np.ndarray,
        repetition: np.ndarray,
        penalised: np.ndarray,
        floats: np.ndarray,
    ) -> gumbel_max.PenaltyTables:
        """The C step's view of the rows of slots `host_slots` (CPU tables), with room for the
        token it records: repetition / penalised [b] bool per row, floats [b, NUM_FLOATS] their
        parameter rows (step.py's columns). The caller then `advance`s the penalised rows."""
        out_len = np.where(penalised, self.output.lengths[host_slots], -1)
        self.reserve(int(out_len.max()) + 1)
        return gumbel_max.PenaltyTables(
            self.prompt.data,
            self.output.data,
            self.counts.data,
            np.where(repetition, self.prompt.lengths[host_slots], 0),
            out_len,
            floats[:, REP_V : PRES_V + 1],
        )

    def reserve(self, width: int) -> None:
        """Room for `width` output ids per slot (before a kernel records a token at a row's
        current length)."""
        self.output.reserve(width)
        self.counts.reserve(width)

    def advance(self, host_slots: np.ndarray) -> None:
        """The device recorded one token for each of `host_slots`: move their lengths on."""
        self.output.lengths[host_slots] += 1
        self.counts.lengths[host_slots] += 1

    def record(
        self,
        slots: torch.Tensor,
        host_slots: np.ndarray,
        tokens: torch.Tensor,
        device_cols: torch.Tensor,
    ) -> None:
        """Append each row's sampled token (device tensors; `device_cols` = current lengths)."""
        width = self.output.width(host_slots)
        self.output.reserve(width + 1)
        self.counts.reserve(width + 1)
        if tokens.device.type == "cpu" and row_stats.available():  # one C call, same tables
            row_stats.record_tokens(self.output.data, self.counts.data, slots, tokens, device_cols)
        else:
            self._record_torch(slots, tokens, device_cols, width)
        self.output.lengths[host_slots] += 1
        self.counts.lengths[host_slots] += 1

    def _record_torch(
        self, slots: torch.Tensor, tokens: torch.Tensor, device_cols: torch.Tensor, width: int
    ) -> None:
        """`record`'s table updates with torch ops (columns < width hold each row's history)."""
        if width:
            match = self.output.take(slots, width) == tokens[:, None]
            seen = match.any(1)
            first = match.to(torch.uint8).argmax(1)
            self.counts.data.index_put_((slots, first), seen.to(torch.int32), accumulate=True)
        else:
            seen = torch.zeros_like(tokens, dtype=torch.bool)
        self.output.data[slots, device_cols] = tokens
        self.counts.data[slots, device_cols] = (~seen).to(torch.int32)
