"""The fused full-vocabulary Gumbel-max of `gumbel_max.c`: build, load, call (ctypes).

Built into the kernel cache like the projection kernels; `available()` is False where it cannot
be (no AVX2, no compiler), and the sampler then keeps to its torch expression of the same pick.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from winnow.kernels.cpu.cpu_kernels import load_library

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
    lib.winnow_gumbel_argmax.argtypes = [*(_PTR, _I64, _I64, _I64), *(_PTR,) * 5, ctypes.c_int]
    lib.winnow_gumbel_argmax.restype = None
    wanted = os.environ.get("WINNOW_CPU_ISA", "auto").lower() != "avx2"
    lib.winnow_gumbel_init(int(wanted))
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
    """The kernel's token-mix table: noise.token_mix values (int64 in [0, 2**32)) as 32 bits."""
    return token_mix.to(torch.int64).to(torch.uint32).view(torch.int32).contiguous()


def gumbel_argmax(
    z: torch.Tensor,
    temperature: torch.Tensor,
    keys: torch.Tensor,
    token_mix: torch.Tensor,
    y_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row of z [b, V] (float32, CPU, unit inner stride): the lowest id with the largest
    min(z / T, FLOAT32_MAX) + gumbel noise; writes y = min(z / T, FLOAT32_MAX) into y_out when
    given (same strides as z; may be z). temperature [b] float32, keys [b] int64 row keys,
    token_mix [V] int32: `mix_table(noise.token_mix(ids))`, kept by the caller."""
    lib = _library()
    assert lib is not None and z.dtype == torch.float32 and z.stride(1) == 1
    rows, vocab = z.shape
    assert token_mix.dtype == torch.int32 and token_mix.shape == (vocab,)
    tokens = torch.empty(rows, dtype=torch.int64)
    if rows == 0:
        return tokens
    temperature = temperature.to(torch.float32).contiguous()
    keys = keys.to(torch.int64).contiguous()
    if y_out is not None:
        assert y_out.stride() == z.stride() and y_out.dtype == torch.float32
    lib.winnow_gumbel_argmax(
        z.data_ptr(), rows, vocab, z.stride(0), temperature.data_ptr(), keys.data_ptr(),
        token_mix.data_ptr(),
        None if y_out is None else y_out.data_ptr(), tokens.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return tokens
