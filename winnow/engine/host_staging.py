"""Per-step model inputs on their way from host arrays to the device.

On CUDA they are written into page-locked (pinned) host buffers, kept from step to step, and
copied with `non_blocking=True`: the copies queue behind the GPU's work instead of stalling the
host, which a copy from pageable memory does. A buffer is rewritten only after the copies of the
step before have finished (an event recorded at the end of each step's copies). On a CPU the
arrays' memory is used as it is.
"""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}
        self._copied: torch.cuda.Event | None = None

    def begin_step(self) -> None:
        """Wait until the previous step's copies out of the pinned buffers are done."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def end_step(self) -> None:
        if self.pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def to_host(self, name: str, array: np.ndarray) -> torch.Tensor:
        """`array` as an int64 tensor in buffer `name` (pinned on CUDA), to copy from."""
        if not self.pinned:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < array.size:
            size = max(array.size, 2 * (0 if buffer is None else buffer.numel()), 256)
            buffer = torch.empty(size, dtype=torch.long, pin_memory=True)
            self._buffers[name] = buffer
        staged = buffer[: array.size]
        staged.numpy()[:] = array.reshape(-1)
        return staged.view(array.shape)

    def to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        return self.to_host(name, array).to(self.device, non_blocking=True)
