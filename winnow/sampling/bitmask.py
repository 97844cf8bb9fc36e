"""Applying grammar token bitmasks to logits: `z[row, t] = -inf` where bit t of the row's mask
is clear (bit j of 32-bit word w stands for token 32 * w + j).

On a CPU the small C kernel in `bitmask.c` does it (one select per token of each word that
bans anything, built and loaded like the model's CPU kernels); elsewhere, or where it cannot be
built, a torch expression of the same rule.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from winnow.kernels.cpu.cpu_kernels import build_library

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("bitmask.c")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@dataclass(frozen=True)
class TokenMasks:
    """Bitmasks for some rows of a batch: `bits[i]` ([ceil(V/32)] int32) constrains batch row
    `rows[i]`; rows not listed are unconstrained."""

    rows: np.ndarray  # int64, host
    bits: torch.Tensor  # [len(rows), ceil(V/32)] int32, on the sampler's device


def words_for(vocab_size: int) -> int:
    return -(-vocab_size // 32)


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(build_library(_SOURCE, "winnow_bitmask")))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        logger.warning("bitmask C kernel unavailable, using torch: %s", exc)
        return None
    lib.winnow_apply_bitmask.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64]
    lib.winnow_apply_bitmask.restype = None
    return lib


def c_kernel_available() -> bool:
    return _library() is not None


def apply_bitmask(z: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> None:
    """In place: mask rows `rows` (int64 [R], on z's device) of z [B, V] float32 with `bits`."""
    if rows.numel() == 0:
        return
    if z.device.type == "cpu" and _library() is not None:
        apply_bitmask_c(z, rows, bits)
    else:
        apply_bitmask_torch(z, rows, bits)


def apply_bitmask_c(z: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> None:
    lib = _library()
    assert lib is not None, "the bitmask C kernel is not available"
    _check(z, rows, bits)
    assert z.device.type == "cpu" and z.stride(1) == 1
    bits = bits.contiguous()
    rows = rows.contiguous()
    lib.winnow_apply_bitmask(
        z.data_ptr(), z.stride(0), bits.data_ptr(), bits.stride(0),
        rows.data_ptr(), rows.numel(), z.shape[1],
    )  # fmt: skip


def apply_bitmask_torch(z: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> None:
    _check(z, rows, bits)
    vocab = z.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=z.device)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(bits.shape[0], -1)[:, :vocab]
    masked = z.index_select(0, rows).masked_fill_(~allowed, -torch.inf)
    z.index_copy_(0, rows, masked)


def _check(z: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> None:
    if z.dtype != torch.float32 or bits.dtype != torch.int32 or rows.dtype != torch.int64:
        raise TypeError("bitmask: z float32, bits int32 and rows int64 expected")
    if bits.shape != (rows.numel(), words_for(z.shape[1])):
        raise ValueError(f"bitmask shape {tuple(bits.shape)} does not fit {tuple(z.shape)}")
