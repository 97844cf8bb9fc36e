"""Whole-row helpers of the sampler (`row_stats.c`): the load of the logits into its work buffer,
top-n candidates and the top_p normaliser, each one vectorised pass per row, and the thresholded
route's scan (candidates and normaliser in one pass over the model's logits, patched tokens read
from the work buffer). Built and loaded like the other CPU kernels; `available()` is False where
they cannot be, and the sampler keeps to torch ops.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from winnow.kernels.cpu.cpu_kernels import avx512_wanted, load_library

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
    lib.winnow_load_rows.argtypes = [_PTR, *(_I64,) * 3, _PTR, _PTR, _PTR, _I64, ctypes.c_int]
    lib.winnow_load_rows.restype = None
    lib.winnow_seed_patches.argtypes = [_PTR, *(_I64,) * 3, _PTR, _PTR, _PTR, _I64, _PTR]
    lib.winnow_seed_patches.restype = None
    lib.winnow_scan_rows.argtypes = [
        *(_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I64),
        *(_PTR,) * 5,
        ctypes.c_int,
    ]
    lib.winnow_scan_rows.restype = None
    lib.winnow_source_mass.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _I64]
    lib.winnow_source_mass.argtypes += [_PTR, _PTR, _PTR, ctypes.c_int]
    lib.winnow_source_mass.restype = None
    lib.winnow_penalise.argtypes = [_PTR, _I64, _PTR]
    lib.winnow_penalise.restype = None
    lib.winnow_record_tokens.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64]
    lib.winnow_record_tokens.restype = None
    lib.winnow_row_logprobs.argtypes = [_PTR, _PTR, *(_I64,) * 4, *(_PTR,) * 3, ctypes.c_int]
    lib.winnow_row_logprobs.restype = None
    lib.winnow_slice_logprobs.argtypes = [*(_PTR,) * 4, *(_I64,) * 4, *(_PTR,) * 5, ctypes.c_int]
    lib.winnow_slice_logprobs.restype = None
    lib.winnow_row_stats_init.argtypes = [ctypes.c_int]
    lib.winnow_row_stats_init.restype = ctypes.c_int
    lib.winnow_row_stats_init(int(avx512_wanted()))
    return lib


def available() -> bool:
    return _library() is not None


def use_avx512(wanted: bool) -> bool:
    """Switch `scan_rows` between its AVX-512 and AVX2 loops (tests); returns whether AVX-512
    is in use."""
    lib = _library()
    return lib is not None and bool(lib.winnow_row_stats_init(int(wanted)))


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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def row_logprobs(
    z: torch.Tensor, k: int, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse [n], values [n, k], ids [n, k]) of rows of z [*, V] (float32, unit inner stride; the
    rows `rows` [n] int64, else all), each read cleaned (NaN -> -inf, +inf -> FLOAT32_MAX):
    lse = max + log(sum_j exp(z_j - max)) in float64 from float32 exps (-inf for a row with no
    finite value), and its k <= V largest values and their ids, by value descending then id
    ascending. One call, no [n, V] temporary."""
    lib = _checked(z)
    vocab = z.shape[1]
    assert 0 <= k <= vocab
    rows = None if rows is None else rows.to(torch.int64).contiguous()
    n = z.shape[0] if rows is None else rows.shape[0]
    lse = torch.empty(n, dtype=torch.float32)
    values = torch.empty(n, k, dtype=torch.float32)
    ids = torch.empty(n, k, dtype=torch.int64)
    if n:
        lib.winnow_row_logprobs(
            z.data_ptr(), _ptr(rows), n, vocab, z.stride(0), k, lse.data_ptr(),
            values.data_ptr(), ids.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return lse, values, ids


def slice_logprobs(
    ys: torch.Tensor,
    ids: torch.Tensor,
    keep: torch.Tensor,
    k: int,
    vocab: int,
    tokens: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`row_logprobs` of rows given as a candidate slice, from the slice alone: row r holds
    ys[s] at ids[s] where keep[s] and -inf at every other of the `vocab` tokens (ys float32, no
    NaN, ids int64 and keep bool, all [*, w]; s = rows[r], else r). Returns (lse [n], the value
    of token tokens[r] [n] (-inf where it is no survivor), values [n, k], ids [n, k]), each the
    value `row_logprobs` gives for the [n, V] row (the same float32 exps, summed in the same
    order), without the row."""
    lib = _library()
    assert lib is not None and ys.dtype == torch.float32 and keep.dtype == torch.bool
    assert ys.device.type == "cpu" and ys.shape == ids.shape == keep.shape and 0 <= k <= vocab
    ys, ids, keep = ys.contiguous(), ids.to(torch.int64).contiguous(), keep.contiguous()
    rows = None if rows is None else rows.to(torch.int64).contiguous()
    tokens = tokens.to(torch.int64).contiguous()
    n = ys.shape[0] if rows is None else rows.shape[0]
    assert tokens.shape == (n,)
    lse, chosen = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    values = torch.empty(n, k, dtype=torch.float32)
    top_ids = torch.empty(n, k, dtype=torch.int64)
    if n:
        lib.winnow_slice_logprobs(
            ys.data_ptr(), ids.data_ptr(), keep.data_ptr(), _ptr(rows), n, ys.shape[1], vocab, k,
            tokens.data_ptr(), lse.data_ptr(), chosen.data_ptr(), values.data_ptr(),
            top_ids.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return lse, chosen, values, top_ids


def load_rows(
    logits: torch.Tensor,
    order: torch.Tensor | None,
    z: torch.Tensor,
    patch_ids: torch.Tensor | None = None,
) -> None:
    """z[r] = logits[order[r]] (logits[r] without an order), NaN -> -inf, +inf -> FLOAT32_MAX.

    logits [n, V] float32 with unit inner stride; z [b, V] contiguous; order [b] int64 (CPU).
    patch_ids [b, w] int64 (-1: padding): tokens of each row whose value in z is kept."""
    lib = _checked(logits)
    rows, vocab = z.shape
    assert z.is_contiguous() and logits.shape[1] == vocab
    order = None if order is None else order.contiguous()
    patch_ids = None if patch_ids is None else patch_ids.contiguous()
    width = 0 if patch_ids is None else patch_ids.shape[1]
    if rows:
        lib.winnow_load_rows(
            logits.data_ptr(), rows, vocab, logits.stride(0), _ptr(order), z.data_ptr(),
            _ptr(patch_ids), width, torch.get_num_threads(),
        )  # fmt: skip


def seed_patches(
    logits: torch.Tensor,
    order: torch.Tensor | None,
    z: torch.Tensor,
    patch_ids: torch.Tensor,
    stage: StageOne | None = None,
) -> None:
    """z[r, id] = the cleaned logits[order[r], id] for each id in patch_ids[r] (-1: padding),
    the values the penalties then work on (shapes as `load_rows`); with `stage` (its rows being
    rows of z, their ids among their patch ids), stage 1 too, as `penalise` on the flat z, each
    row right after its seeding while its tokens are in cache."""
    lib = _checked(logits)
    rows, vocab = z.shape
    assert z.is_contiguous() and logits.shape[1] == vocab and patch_ids.shape[0] == rows
    order = None if order is None else order.contiguous()
    patch_ids = patch_ids.contiguous()
    args, _kept = _stage_one_args(stage) if stage is not None else (None, ())
    lib.winnow_seed_patches(
        logits.data_ptr(), rows, vocab, logits.stride(0), _ptr(order), z.data_ptr(),
        patch_ids.data_ptr(), patch_ids.shape[1], None if args is None else ctypes.addressof(args),
    )  # fmt: skip


def scan_rows(
    logits: torch.Tensor,
    order: torch.Tensor | None,
    patch_ids: torch.Tensor | None,
    patch: torch.Tensor,
    n: int,
    temperature: torch.Tensor,
    want_mass: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thresholded route's pass over rows of the model's logits: row r is logits[order[r]]
    cleaned (NaN -> -inf, +inf -> FLOAT32_MAX), with the tokens in patch_ids[r] (-1: padding)
    read from patch[r] (the work buffer's rows [b, V]) instead. Returns (values, ids) [b, n] as
    `top_candidates` and [b, 2] float64 bounds (lo, hi) on what `total_mass` gives for the rows
    where want_mass [b] (bool) holds (1.0 elsewhere), all in one pass per row."""
    lib = _checked(logits)
    rows, vocab = patch.shape
    assert patch.is_contiguous() and logits.shape[1] == vocab
    values = torch.empty(rows, n, dtype=torch.float32)
    ids = torch.empty(rows, n, dtype=torch.int64)
    mass = torch.ones(rows, 2, dtype=torch.float64)
    order = None if order is None else order.contiguous()
    patch_ids = None if patch_ids is None else patch_ids.contiguous()
    width = 0 if patch_ids is None else patch_ids.shape[1]
    temperature = temperature.to(torch.float32).contiguous()
    wanted = None if want_mass is None else want_mass.to(torch.uint8).contiguous()
    if rows and n:
        lib.winnow_scan_rows(
            logits.data_ptr(), rows, vocab, logits.stride(0), _ptr(order), _ptr(patch_ids),
            width, patch.data_ptr(), n, temperature.data_ptr(), _ptr(wanted),
            values.data_ptr(), ids.data_ptr(), mass.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return values, ids, mass


def source_mass(
    logits: torch.Tensor,
    order: torch.Tensor | None,
    patch_ids: torch.Tensor | None,
    patch: torch.Tensor,
    rows: np.ndarray,
    temperature: torch.Tensor,
    row_max: torch.Tensor,
) -> torch.Tensor:
    """`total_mass` [n] of the work rows `rows` as `scan_rows` reads them (logits[order[r]]
    cleaned, patch_ids[r] from patch[r]; all indexed by work row), without loading them into
    the work buffer. temperature and row_max [n]: per entry of `rows`."""
    lib = _checked(logits)
    vocab = patch.shape[1]
    assert patch.is_contiguous() and logits.shape[1] == vocab
    n = len(rows)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    order = None if order is None else order.contiguous()
    patch_ids = None if patch_ids is None else patch_ids.contiguous()
    width = 0 if patch_ids is None else patch_ids.shape[1]
    temperature = temperature.to(torch.float32).contiguous()
    row_max = row_max.to(torch.float32).contiguous()
    assert temperature.shape == row_max.shape == (n,)
    mass = torch.empty(n, dtype=torch.float64)
    if n:
        lib.winnow_source_mass(
            logits.data_ptr(), vocab, logits.stride(0), _ptr(order), _ptr(patch_ids), width,
            patch.data_ptr(), rows.ctypes.data, n, temperature.data_ptr(), row_max.data_ptr(),
            mass.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return mass


@dataclass(frozen=True)
class StageOne:
    """Stage 1 (penalties.PenaltyHistory.apply) for n work rows: rows [n]; prompt [n, wp] and
    output [n, wo] ids (-1: padding); counts [n, wo] int32 (with frequency_presence [n, 2]);
    repetition [n] (with prompt)."""

    rows: torch.Tensor
    prompt: torch.Tensor | None
    output: torch.Tensor
    counts: torch.Tensor | None
    repetition: torch.Tensor | None
    frequency_presence: torch.Tensor | None


class _StageOneArgs(ctypes.Structure):
    _fields_ = [
        ("rows", _PTR), ("n", _I64), ("prompt", _PTR), ("wp", _I64), ("output", _PTR),
        ("counts", _PTR), ("wo", _I64), ("repetition", _PTR), ("frequency_presence", _PTR),
    ]  # fmt: skip


def _stage_one_args(stage: StageOne) -> tuple[_StageOneArgs, tuple[torch.Tensor | None, ...]]:
    """The C structure for `stage`, and the tensors it points into (keep them alive)."""
    kept = (
        stage.rows.contiguous(),
        None if stage.prompt is None else stage.prompt.contiguous(),
        stage.output.contiguous(),
        None if stage.counts is None else stage.counts.to(torch.int32).contiguous(),
        None if stage.repetition is None else stage.repetition.to(torch.float32).contiguous(),
        None
        if stage.frequency_presence is None
        else stage.frequency_presence.to(torch.float32).contiguous(),
    )
    rows, prompt, output, counts, repetition, frequency_presence = kept
    args = _StageOneArgs(
        rows.data_ptr(), rows.shape[0], _ptr(prompt), 0 if prompt is None else prompt.shape[1],
        output.data_ptr(), _ptr(counts), output.shape[1], _ptr(repetition),
        _ptr(frequency_presence),
    )  # fmt: skip
    return args, kept


def penalise(z: torch.Tensor, vocab: int, stage: StageOne) -> None:
    """penalties.PenaltyHistory.apply in C, in place on the flat work buffer z (CPU float32).
    Same float32 operations, so the same values."""
    lib = _library()
    assert lib is not None and z.dtype == torch.float32 and z.is_contiguous()
    if stage.rows.shape[0] == 0:
        return
    args, _kept = _stage_one_args(stage)
    lib.winnow_penalise(z.data_ptr(), vocab, ctypes.addressof(args))


def record_tokens(
    output: torch.Tensor,
    counts: torch.Tensor,
    slots: torch.Tensor,
    tokens: torch.Tensor,
    cols: torch.Tensor,
) -> None:
    """penalties.PenaltyHistory.record in C, in place: output [S, w] int64 and counts [S, w']
    int32 (CPU, unit inner stride, room for column cols[i]); slot slots[i] appends tokens[i]
    at column cols[i], and the count of the token's first earlier occurrence (or of the new
    column, when there is none) goes up by one."""
    lib = _library()
    assert lib is not None and output.dtype == torch.int64 and counts.dtype == torch.int32
    assert output.stride(1) == 1 and counts.stride(1) == 1 and output.device.type == "cpu"
    slots, tokens, cols = (t.to(torch.int64).contiguous() for t in (slots, tokens, cols))
    lib.winnow_record_tokens(
        output.data_ptr(), output.stride(0), counts.data_ptr(), counts.stride(0),
        slots.data_ptr(), tokens.data_ptr(), cols.data_ptr(), slots.shape[0],
    )  # fmt: skip
