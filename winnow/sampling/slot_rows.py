"""Per-slot variable-length rows kept in one padded device tensor that grows by doubling."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class SlotRows:
    """A [slots, capacity] tensor; slot s holds `lengths[s]` values, then `pad`.

    Lengths live on the host (numpy), so batch widths are known without a device sync.
    """

    def __init__(
        self, slots: int, dtype: torch.dtype, pad: float | int, device: torch.device
    ) -> None:
        self.pad = pad
        self.data = torch.full((slots, 1), pad, dtype=dtype, device=device)
        self.lengths = np.zeros(slots, dtype=np.int64)

    def reserve(self, width: int) -> None:
        """Make room for `width` values per slot (amortised doubling)."""
        capacity = self.data.shape[1]
        if width <= capacity:
            return
        grown = torch.full(
            (self.data.shape[0], max(width, 2 * capacity)),
            self.pad,
            dtype=self.data.dtype,
            device=self.data.device,
        )
        grown[:, :capacity] = self.data
        self.data = grown

    def assign(self, slot: int, values: Sequence[float] | np.ndarray) -> None:
        """Replace the contents of `slot` (host -> device copy; used outside the hot path)."""
        count = len(values)
        self.reserve(count)
        self.data[slot] = self.pad
        if count:
            self.data[slot, :count] = torch.as_tensor(
                np.asarray(values), dtype=self.data.dtype, device=self.data.device
            )
        self.lengths[slot] = count

    def width(self, slots: np.ndarray) -> int:
        """Longest row among `slots` (host-side)."""
        return int(self.lengths[slots].max()) if len(slots) else 0

    def take(self, slots: torch.Tensor, width: int) -> torch.Tensor:
        """[len(slots), width] copy of the first `width` columns of the given slots."""
        return self.data[:, :width].index_select(0, slots)
