"""The sampler's Gumbel-max kernels of `gumbel_max.c` (the fused full-vocabulary pass, the
plain temperature step with its penalties, logit_bias and bans in one call, and the pick on a
thresholded row's candidate slice): build, load, call (ctypes).

Built into the kernel cache like the projection kernels; `available()` is False where it cannot
be (no AVX2, no compiler), and the sampler then keeps to its torch expression of the same pick.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from winnow.kernels.cpu.cpu_kernels import avx512_wanted, load_library

_SOURCE = Path(__file__).with_name("gumbel_max.c")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "winnow_gumbel", "Gumbel-max C kernel")
    if lib is None:
        return None
    lib.winnow_gumbel_init.argtypes = [ctypes.c_int]
    lib.winnow_gumbel_init.restype = ctypes.c_int
    lib.winnow_gumbel_noise.argtypes = [_PTR, _I64, _PTR]
    lib.winnow_gumbel_noise.restype = None
    lib.winnow_gumbel_argmax.argtypes = [
        *(_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64),
        *(_PTR,) * 6,
        ctypes.c_int,
    ]
    lib.winnow_gumbel_argmax.restype = None
    lib.winnow_slice_pick.argtypes = [_PTR, _PTR, _I64, _I64, _I64, *(_PTR,) * 6, ctypes.c_int]
    lib.winnow_slice_pick.restype = None
    lib.winnow_gumbel_step.argtypes = [
        *(_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR),
        *(_PTR, _I64, _PTR, _I64, _PTR),
        *(_PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR),
        _PTR,
        ctypes.c_int,
    ]
    lib.winnow_gumbel_step.restype = None
    lib.winnow_gumbel_init(int(avx512_wanted()))
    return lib


def available() -> bool:
    return _library() is not None


def use_avx512(wanted: bool) -> bool:
    """Switch between the AVX-512 and AVX2 loops (tests); returns whether AVX-512 is in use."""
    lib = _library()
    return lib is not None and bool(lib.winnow_gumbel_init(int(wanted)))


def noise_floats(bits: torch.Tensor) -> torch.Tensor:
    """float32(log(-log u)) of int64 hash values in [0, 2**32), as the kernel computes it."""
    lib = _library()
    assert lib is not None
    packed = bits.to(torch.int64).to(torch.uint32).contiguous()
    out = torch.empty(packed.shape, dtype=torch.float32)
    lib.winnow_gumbel_noise(packed.data_ptr(), packed.numel(), out.data_ptr())
    return out


def mix_table(token_mix: torch.Tensor) -> torch.Tensor:
    """The kernel's token-mix table: noise.token_mix values (int64 in [0, 2**32)) with the hash's
    first round (m ^ m >> 16) applied, as 32 bits (see gumbel_max.c)."""
    mix = token_mix.to(torch.int64)
    return (mix ^ (mix >> 16)).to(torch.uint32).view(torch.int32).contiguous()


def gumbel_argmax(
    z: torch.Tensor,
    temperature: torch.Tensor,
    keys: torch.Tensor,
    token_mix: torch.Tensor,
    y_out: torch.Tensor | None = None,
    *,
    order: torch.Tensor | None = None,
    patch_ids: torch.Tensor | None = None,
    patch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row of z [b, V] (float32, CPU, unit inner stride): the lowest id with the largest
    min(z / T, FLOAT32_MAX) + gumbel noise; writes y = min(z / T, FLOAT32_MAX) into y_out when
    given (same strides as z; may be z). temperature [b] float32, keys [b] int64 row keys,
    token_mix [V] int32: `mix_table(noise.token_mix(ids))`, kept by the caller.

    order [b] int64: row r is z[order[r]] (z then has any number of rows). patch_ids [b, w] int64
    (-1: padding) with patch [b, V] contiguous: row r's tokens in patch_ids[r] take their value
    from patch[r] (the work buffer's penalised, biased and banned values)."""
    lib = _library()
    assert lib is not None and z.dtype == torch.float32 and z.stride(1) == 1
    vocab = z.shape[1]
    rows = z.shape[0] if order is None else order.shape[0]
    assert token_mix.dtype == torch.int32 and token_mix.shape == (vocab,)
    tokens = torch.empty(rows, dtype=torch.int64)
    if rows == 0:
        return tokens
    temperature = temperature.to(torch.float32).contiguous()
    keys = keys.to(torch.int64).contiguous()
    if y_out is not None:
        assert y_out.stride() == z.stride() and y_out.dtype == torch.float32
        assert order is None and patch_ids is None
    width = 0
    if patch_ids is not None:
        assert patch is not None and patch.is_contiguous() and patch.shape == (rows, vocab)
        patch_ids = patch_ids.contiguous()
        width = patch_ids.shape[1]
    order = None if order is None else order.contiguous()
    lib.winnow_gumbel_argmax(
        z.data_ptr(), rows, vocab, z.stride(0), _ptr(order), _ptr(patch_ids), width,
        _ptr(patch), temperature.data_ptr(), keys.data_ptr(), token_mix.data_ptr(), _ptr(y_out),
        tokens.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return tokens


def plain_step(
    z: torch.Tensor,
    seeds: np.ndarray,
    positions: np.ndarray,
    temperature: np.ndarray,
    token_mix: torch.Tensor,
    *,
    slots: np.ndarray | None = None,
    history: PenaltyTables | None = None,
    edits: StageTwoTables | None = None,
) -> torch.Tensor:
    """The sampler's plain temperature step in one C call: per row r of z [b, V] (float32, CPU,
    unit inner stride), `gumbel_argmax`'s pick with the row key of seeds / positions [b] (int64)
    and temperature [b] (float32; numpy), after the row's stages 1-2 read straight from the
    sampler's tables at slot slots[r] (int64; needed with either table):

    - `history` (None: no row has a penalty): the repetition penalty on the distinct prompt and
      output ids, then frequency and presence on the output ids, with the float32 operations of
      penalties.PenaltyHistory.apply; each penalised row's token is then recorded there as
      PenaltyHistory.record does (the caller has made room and moves the lengths on);
    - `edits` (None: no row has a bias or a ban): logit_bias added, then the banned ids at -inf,
      as Sampler._penalise applies them.

    No torch op, no copy of a row."""
    lib = _library()
    assert lib is not None and z.dtype == torch.float32 and z.stride(1) == 1
    rows, vocab = z.shape
    assert token_mix.dtype == torch.int32 and token_mix.shape == (vocab,)
    tokens = torch.empty(rows, dtype=torch.int64)
    if rows == 0:
        return tokens
    per_row = [np.ascontiguousarray(a) for a in (seeds, positions, temperature)]
    assert per_row[0].dtype == per_row[1].dtype == np.int64 and per_row[2].dtype == np.float32
    assert all(a.shape == (rows,) for a in per_row)
    held: list[np.ndarray] = []  # the arrays the pointers below point into

    def pointer(a: np.ndarray, dtype: type = np.int64) -> int:
        held.append(np.ascontiguousarray(a, dtype=dtype))
        assert held[-1].shape[0] == rows
        return held[-1].ctypes.data

    def table(t: torch.Tensor, dtype: torch.dtype, room: int = 0) -> list[int]:
        """A slot table's pointer and row stride, for rows that read `room` columns."""
        assert t.dtype == dtype and t.device.type == "cpu" and t.stride(1) == 1
        assert slots is not None and int(slots.max()) < t.shape[0] and room <= t.shape[1]
        return [t.data_ptr(), t.stride(0)]

    penalties: list[int | None] = [None, None, 0, None, None, 0, None, 0, None]
    if history is not None:
        h = history
        assert h.penalty.shape == (rows, 3)
        room = int(h.output_len.max()) + 1  # the recorded token's column
        penalties = [
            pointer(h.penalty, np.float32),
            *table(h.prompt, torch.int64, int(h.prompt_len.max())), pointer(h.prompt_len),
            *table(h.output, torch.int64, room), *table(h.counts, torch.int32, room),
            pointer(h.output_len),
        ]  # fmt: skip
    stage_two: list[int | None] = [None, None, 0, None, None, 0, None]
    if edits is not None:
        e = edits
        bias_ids, stride = table(e.bias_ids, torch.int64, int(e.bias_len.max()))
        values, values_stride = table(e.bias_values, torch.float32, int(e.bias_len.max()))
        assert values_stride == stride
        stage_two = [
            bias_ids, values, stride, pointer(e.bias_len),
            *table(e.ban_ids, torch.int64, int(e.ban_len.max())), pointer(e.ban_len),
        ]  # fmt: skip
    lib.winnow_gumbel_step(
        z.data_ptr(), rows, vocab, z.stride(0), *(a.ctypes.data for a in per_row),
        token_mix.data_ptr(), None if slots is None else pointer(slots), *penalties,
        *stage_two, tokens.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return tokens


@dataclass
class PenaltyTables:
    """`plain_step`'s view of a penalty history, for rows r of the batch (slot s = slots[r]):
    the distinct prompt ids prompt[s, :prompt_len[r]] (0: no repetition penalty) and output ids
    and counts output[s, :output_len[r]] / counts[s, ...] (counts > 0 at each distinct id's
    first occurrence, 0 elsewhere; output_len -1: a row without penalties), penalty[r] =
    (repetition, frequency, presence) float32."""

    prompt: torch.Tensor
    output: torch.Tensor
    counts: torch.Tensor
    prompt_len: np.ndarray
    output_len: np.ndarray
    penalty: np.ndarray


@dataclass
class StageTwoTables:
    """`plain_step`'s view of the sampler's stage 2 tables, for rows r of the batch (slot s =
    slots[r]): logit_bias's distinct ids and values bias_ids[s, :bias_len[r]] /
    bias_values[s, ...] (float32, laid out as the ids), and the ids banned this step
    ban_ids[s, :ban_len[r]] (0: no active min_tokens ban)."""

    bias_ids: torch.Tensor
    bias_values: torch.Tensor
    bias_len: np.ndarray
    ban_ids: torch.Tensor
    ban_len: np.ndarray


# One row's inputs to `slice_pick`: `slice_row` in gumbel_max.c, field for field.
SLICE_ROW = np.dtype(
    [
        ("temperature", np.float32),
        ("top_p", np.float32),
        ("min_p", np.float32),
        ("xtc_probability", np.float32),
        ("xtc_threshold", np.float32),
        ("top_k", np.int64),
        ("seed", np.int64),
        ("position", np.int64),
        ("total_mass", np.float64),
        ("total_mass_hi", np.float64),
    ],
    align=True,
)


def slice_pick(
    values: torch.Tensor,
    ids: torch.Tensor,
    params: np.ndarray,
    token_mix: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thresholded route's pick on candidate slices (routes.Routes._pick in C): values [b, n]
    float32 and ids [b, n] int64, each row sorted by value descending; params [b] of SLICE_ROW
    (top_k 0 = off, top_p 1 = off, min_p 0 = off, XTC off at probability 0; total_mass and
    total_mass_hi bound the top_p normaliser of a row without top_k, equal when it is known).
    Returns (tokens [b] int64, overflow [b] bool: the slice may miss a survivor of the whole
    row, undecided [b] bool: the bounds keep different tokens, so the row's token is not known
    until it is picked again with its exact normaliser). keep [b, n] bool (contiguous), where
    given, receives each row's survivors: what its token was picked from, `Pick.keep`."""
    lib = _library()
    assert lib is not None and values.dtype == torch.float32 and ids.dtype == torch.int64
    rows, n = values.shape
    assert params.dtype == SLICE_ROW and params.shape == (rows,) and token_mix.dtype == torch.int32
    values, ids = values.contiguous(), ids.contiguous()
    params = np.ascontiguousarray(params)
    tokens = torch.empty(rows, dtype=torch.int64)
    overflow = torch.empty(rows, dtype=torch.bool)
    undecided = torch.empty(rows, dtype=torch.bool)
    if keep is not None:
        assert keep.dtype == torch.bool and keep.shape == (rows, n) and keep.is_contiguous()
    if rows:
        lib.winnow_slice_pick(
            values.data_ptr(), ids.data_ptr(), rows, n, token_mix.shape[0],
            params.ctypes.data, token_mix.data_ptr(), tokens.data_ptr(), overflow.data_ptr(),
            undecided.data_ptr(), _ptr(keep), torch.get_num_threads(),
        )  # fmt: skip
    return tokens, overflow, undecided


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
