"""Whole-row helpers of the sampler (`row_stats.c`): the load of the logits into its work buffer,
top-n candidates and the top_p normaliser, each one vectorised pass per row. Built and loaded
like the other CPU kernels; `available()` is False where they cannot be, and the sampler keeps
to torch ops.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from winnow.kernels.cpu.cpu_kernels import load_library

_SOURCE = Path(__file__).with_name("row_stats.c")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "winnow_row_stats", "row-statistics C kernels")
    if lib is None:
        return None
    lib.winnow_top_candidates.argtypes = [_PTR, *(_I64,) * 4, _PTR, _PTR, ctypes.c_int]
    lib.winnow_top_candidates.restype = None
    lib.winnow_total_mass.argtypes = [_PTR, *(_I64,) * 3, *(_PTR,) * 3, ctypes.c_int]
    lib.winnow_total_mass.restype = None
    lib.winnow_load_rows.argtypes = [_PTR, *(_I64,) * 3, _PTR, _PTR, ctypes.c_int]
    lib.winnow_load_rows.restype = None
    return lib


def available() -> bool:
    return _library() is not None


def _checked(z: torch.Tensor) -> ctypes.CDLL:
    lib = _library()
    assert lib is not None and z.dtype == torch.float32 and z.stride(1) == 1
    assert z.device.type == "cpu"
    return lib


def top_candidates(z: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) [b, n] of the n largest of each row of z [b, V] (float32, no NaN), sorted
    descending, ties by id; like torch.topk, which of the tokens tied at the n-th is unspecified."""
    lib = _checked(z)
    rows, vocab = z.shape
    values = torch.empty(rows, n, dtype=torch.float32)
    ids = torch.empty(rows, n, dtype=torch.int64)
    if rows and n:
        lib.winnow_top_candidates(
            z.data_ptr(), rows, vocab, z.stride(0), n, values.data_ptr(), ids.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
    return values, ids


def total_mass(
    z: torch.Tensor, temperature: torch.Tensor, row_max: torch.Tensor | None = None
) -> torch.Tensor:
    """[b] float64 sum_j exp(y_j - max y), y = min(z / T, FLOAT32_MAX), per row of z (no NaN).

    row_max [b]: each row's largest z when the caller has it (a top-n slice's first value), which
    saves the pass that finds it."""
    lib = _checked(z)
    rows, vocab = z.shape
    mass = torch.empty(rows, dtype=torch.float64)
    temperature = temperature.to(torch.float32).contiguous()
    if row_max is not None:
        row_max = row_max.to(torch.float32).contiguous()
        assert row_max.shape == (rows,)
    if rows:
        lib.winnow_total_mass(
            z.data_ptr(), rows, vocab, z.stride(0), temperature.data_ptr(),
            None if row_max is None else row_max.data_ptr(), mass.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
    return mass


def load_rows(logits: torch.Tensor, order: torch.Tensor | None, z: torch.Tensor) -> None:
    """z[r] = logits[order[r]] (logits[r] without an order), NaN -> -inf, +inf -> FLOAT32_MAX.

    logits [n, V] float32 with unit inner stride; z [b, V] contiguous; order [b] int64 (CPU)."""
    lib = _checked(logits)
    rows, vocab = z.shape
    assert z.is_contiguous() and logits.shape[1] == vocab
    if order is not None:
        order = order.contiguous()
    if rows:
        lib.winnow_load_rows(
            logits.data_ptr(), rows, vocab, logits.stride(0),
            None if order is None else order.data_ptr(), z.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
