"""Every running sequence's block table, kept in a fixed row of a host array and of its device
copy, so that a step uploads only the entries that changed since the step before.

A sequence keeps its row from its first scheduled step until `release` (finished or preempted:
a preempted sequence's blocks are handed back, and its table is rebuilt when it resumes). A
decode step usually changes nothing, and a new block every `block_size` tokens per sequence.
On a CPU the device copy is the host array itself.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from winnow.engine.host_staging import HostStaging
from winnow.engine.sequence import Sequence


class BlockTables:
    """`shared`: the device copy is the host array (default: on a CPU)."""

    def __init__(
        self, rows: int, width: int, staging: HostStaging, shared: bool | None = None
    ) -> None:
        self.staging = staging
        self.device = staging.device
        self.shared = self.device.type == "cpu" if shared is None else shared
        self.host = np.zeros((max(1, rows), max(1, width)), dtype=np.int64)
        self.table = self._device_copy(self.host)
        self._row_of: dict[int, int] = {}
        self._free: list[int] = list(range(self.host.shape[0] - 1, -1, -1))
        self._mirrored = [0] * self.host.shape[0]  # entries of each row that match its sequence
        self._changed: list[np.ndarray] = []  # flat indices into `host` to upload

    @property
    def width(self) -> int:
        return self.host.shape[1]

    def rows(self, seqs: Seq[Sequence]) -> np.ndarray:
        """The rows of `seqs` (assigned on first sight), their tables brought up to date on the
        host; `upload` then sends the changes to the device."""
        rows = np.empty(len(seqs), dtype=np.int64)
        row_of = self._row_of
        for i, seq in enumerate(seqs):
            row = row_of.get(seq.seq_id)
            if row is None:
                row = self._assign(seq.seq_id)
            rows[i] = row
            table = seq.block_table
            have, want = self._mirrored[row], len(table)
            if have == want:
                continue
            if want > self.width:
                self._widen(want)
            start = have if want > have else 0
            self.host[row, start:want] = table[start:want]
            self._changed.append(row * self.width + np.arange(start, want))
            self._mirrored[row] = want
        return rows

    def upload(self) -> None:
        """Send the entries changed since the last upload (no copy on a CPU)."""
        if not self._changed:
            return
        flat = np.concatenate(self._changed)
        self._changed = []
        if self.shared:
            return
        index = self.staging.to_device("table-index", flat)
        values = self.staging.to_device("table-values", self.host.reshape(-1)[flat])
        self.table.view(-1).index_copy_(0, index, values)

    def release(self, seq_id: int) -> None:
        """Free the row of a sequence that finished or was preempted."""
        row = self._row_of.pop(seq_id, None)
        if row is not None:
            self._mirrored[row] = 0
            self._free.append(row)

    def _assign(self, seq_id: int) -> int:
        if not self._free:
            self._grow_rows()
        row = self._free.pop()
        self._row_of[seq_id] = row
        self._mirrored[row] = 0
        return row

    def _grow_rows(self) -> None:
        old = self.host.shape[0]
        self._resize(2 * old, self.width)
        self._free.extend(range(2 * old - 1, old - 1, -1))
        self._mirrored.extend([0] * old)

    def _widen(self, width: int) -> None:
        self._resize(self.host.shape[0], max(width, 2 * self.width))

    def _resize(self, rows: int, width: int) -> None:
        """A new, larger pair of arrays: everything is re-uploaded (a rare event: the limits
        the engine sizes the tables by are exceeded)."""
        old_rows, old_width = self.host.shape
        host = np.zeros((rows, width), dtype=np.int64)
        host[:old_rows, :old_width] = self.host
        self.host = host
        self.table = self._device_copy(host)
        self._changed = []

    def _device_copy(self, host: np.ndarray) -> torch.Tensor:
        if self.shared:
            return torch.from_numpy(host)
        return torch.from_numpy(host).to(self.device, copy=True)
