"""Build, load and call the AVX2/AVX-512 kernels in `cpu_kernels.c` (ctypes, no torch headers).

The C file is compiled once per source version with the system C compiler into
`$WINNOW_CACHE_DIR/kernels/` and loaded after torch, so that its OpenMP calls use the libgomp
torch already loaded (one thread pool for both). Where that cannot happen (no AVX2/FMA, no
compiler, a failed build) `available()` is False and the models keep to plain PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PANEL = 16  # output features per packed weight panel (one 64-byte row per k)
# element types of the KV cache rows and packed weights the kernels read, and their codes in the
# C file (16-bit elements are widened to fp32 on load; the arithmetic is fp32)
ELEMENT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_avx512_in_use = False  # the C side's current choice (winnow_use_avx512 only reports the new one)


class DecodeLayer(ctypes.Structure):
    """`struct winnow_layer`: one decoder layer's weights and paged cache, as addresses (0 for a
    bias or qk norm the model does not have)."""

    _fields_ = [
        *(
            (name, _PTR)
            for name in (
                "input_norm",
                "post_norm",
                "q_norm",
                "k_norm",
                "qkv",
                "qkv_bias",
                "o",
                "o_bias",
                "gate_up",
                "gate_up_bias",
                "down",
                "down_bias",
                "kcache",
                "vcache",
            )
        ),
        ("window", _I64),
    ]


class DecodeStep(ctypes.Structure):
    """`struct winnow_decode`: the model's shape and one decode-only step's inputs."""

    _fields_ = [
        *((name, _I64) for name in ("hidden_size", "hq", "hkv", "d", "intermediate")),
        ("block_size", _I64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("hidden", _PTR),
        ("t", _I64),
        *((name, _PTR) for name in ("scratch", "cos", "sin", "slots", "rows")),
        ("block_tables", _PTR),
        ("seq_lens", _PTR),
        ("table_width", _I64),
        ("kv_type", ctypes.c_int),
        ("w_type", ctypes.c_int),
        ("nthreads", ctypes.c_int),
    ]


def _cache_dir() -> Path:
    root = Path(os.environ.get("WINNOW_CACHE_DIR") or "~/.cache/winnow").expanduser()
    return root / "kernels"


def _cpu_supported() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build_library(source: Path, prefix: str) -> Path:
    """The shared library compiled from `source` (built once per source version into the kernel
    cache, named `prefix_<digest>.so`); raises OSError, RuntimeError or CalledProcessError."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{prefix}_{digest}.so"
    if not target.exists():
        _build(source, target)
    return target


def _build(source: Path, target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *_FLAGS, str(source), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            text=True,
        )
        built.replace(target)  # atomic: concurrent builders each publish a complete file


def load_library(source: Path, prefix: str, what: str) -> ctypes.CDLL | None:
    """`source` built (once, into the kernel cache) and loaded; None on a CPU without AVX2/FMA or
    when it cannot be built, with the reason logged: the caller keeps to its torch ops."""
    if not _cpu_supported():
        logger.info("%s off: this CPU has no AVX2/FMA", what)
        return None
    try:
        return ctypes.CDLL(str(build_library(source, prefix)))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("%s unavailable, using PyTorch ops: %s", what, detail)
        return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "winnow_cpu", "CPU kernels")
    if lib is None:
        return None
    lib.winnow_linear.argtypes = [
        *(_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR),
        *(ctypes.c_int, ctypes.c_int),  # threads, weight element type
    ]
    lib.winnow_linear.restype = None
    lib.winnow_paged_decode.argtypes = [
        *(_PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR),
        *(_I64, _I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int, ctypes.c_int),
    ]
    lib.winnow_paged_decode.restype = None
    lib.winnow_rms_norm.argtypes = [
        _PTR,
        _I64,
        _I64,
        _I64,
        _PTR,
        ctypes.c_float,
        _PTR,
        ctypes.c_int,
    ]
    lib.winnow_silu_mul.argtypes = [_PTR, _I64, _I64, _I64, _PTR, ctypes.c_int]
    lib.winnow_rope.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, ctypes.c_int]
    for name in ("winnow_rms_norm", "winnow_silu_mul", "winnow_rope"):
        getattr(lib, name).restype = None
    lib.winnow_decode_layers.argtypes = [
        ctypes.POINTER(DecodeLayer),
        _I64,
        ctypes.POINTER(DecodeStep),
    ]
    lib.winnow_decode_layers.restype = None
    lib.winnow_use_avx512.argtypes = [ctypes.c_int]
    lib.winnow_use_avx512.restype = ctypes.c_int
    global _avx512_in_use
    _avx512_in_use = bool(lib.winnow_use_avx512(int(avx512_wanted())))
    logger.info("CPU kernels: %s projections", "AVX-512" if _avx512_in_use else "AVX2")
    return lib


def avx512_wanted() -> bool:
    """Whether the C kernels should take their AVX-512 loops where the CPU has AVX-512F: yes
    unless WINNOW_CPU_ISA=avx2 (auto, the default, and avx512 both mean yes)."""
    wanted = os.environ.get("WINNOW_CPU_ISA", "auto").lower()
    if wanted not in ("auto", "avx2", "avx512"):
        logger.warning("WINNOW_CPU_ISA=%s is not auto, avx2 or avx512: using auto", wanted)
    return wanted != "avx2"


def available() -> bool:
    """Whether the kernels are built and usable on this machine."""
    return _library() is not None


def supports_avx512() -> bool:
    """Whether this CPU can run the AVX-512 projections, whichever ISA is in use now."""
    lib = _lib()
    supported = bool(lib.winnow_use_avx512(1))
    lib.winnow_use_avx512(int(_avx512_in_use))
    return supported


def use_avx512(wanted: bool) -> bool:
    """Run projections on the AVX-512 kernels (the default where the CPU has AVX-512F, unless
    WINNOW_CPU_ISA=avx2) or on the AVX2 ones; returns whether AVX-512 is in use now."""
    global _avx512_in_use
    _avx512_in_use = bool(_lib().winnow_use_avx512(int(wanted)))
    return _avx512_in_use


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("CPU kernels are not available")
    return lib


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[n, k] weight (fp32, fp16 or bf16) -> [ceil(n/16), k, 16] panels of the same dtype (rows
    past n zero), the kernel's layout."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [m, k] fp32 (unit stride along k) @ packed weight -> [m, n] fp32."""
    m, k = x.shape
    assert x.dtype == torch.float32 and x.stride(1) == 1 and packed.shape[1] == k
    out = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return out
    bias_ptr = None if bias is None else bias.data_ptr()
    _lib().winnow_linear(
        x.data_ptr(), m, k, x.stride(0), packed.data_ptr(), n, bias_ptr, out.data_ptr(),
        torch.get_num_threads(), ELEMENT_TYPES[packed.dtype],
    )  # fmt: skip
    return out


def paged_decode(
    q: torch.Tensor,
    out: torch.Tensor,
    tokens: torch.Tensor,
    seqs: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int,
) -> None:
    """Writes out[i] = attention of q[tokens[i]] over the cached k/v of sequence seqs[i].

    q [T, Hq, D] and out [len(tokens), Hq, D] contiguous fp32; kv_cache
    [2, blocks, block_size, Hkv, D] contiguous, in a dtype of ELEMENT_TYPES; block_tables [B, W] and
    seq_lens [B] contiguous int64; window 0 = no sliding window.
    """
    _, hq, d = q.shape
    _, _, block_size, hkv, _ = kv_cache.shape
    _lib().winnow_paged_decode(
        q.data_ptr(), out.data_ptr(), tokens.data_ptr(), seqs.data_ptr(), tokens.numel(),
        kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), block_tables.data_ptr(),
        block_tables.shape[1], seq_lens.data_ptr(), block_size, hq, hkv, d, window,
        d**-0.5, ELEMENT_TYPES[kv_cache.dtype], torch.get_num_threads(),
    )  # fmt: skip


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, last] with unit inner stride and one row stride, if it is without a copy."""
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        return None
    if x.dim() == 2:
        return x
    return x.view(-1, x.shape[-1]) if x.is_contiguous() else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm over the last dim into a new contiguous tensor; None when x's layout does not
    suit the kernel (the caller then uses PyTorch)."""
    rows = _rows(x)
    if rows is None:
        return None
    out = torch.empty(x.shape, dtype=torch.float32)
    _lib().winnow_rms_norm(
        rows.data_ptr(), rows.shape[0], rows.shape[1], rows.stride(0), weight.data_ptr(), eps,
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for gate_up [T, 2I] -> [T, I]; None when the layout does not suit."""
    rows = _rows(gate_up)
    if rows is None or gate_up.dim() != 2:
        return None
    half = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], half, dtype=torch.float32)
    _lib().winnow_silu_mul(
        rows.data_ptr(), rows.shape[0], half, rows.stride(0), out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Rotate-half rotary embedding of x [T, H, D] (heads packed, any token stride) with cos/sin
    [T, 1, D/2] -> new contiguous tensor; None when the layout does not suit."""
    tokens, heads, d = x.shape
    packed_heads = x.stride(2) == 1 and x.stride(1) == d
    tables_ok = all(t.dtype == torch.float32 and t.is_contiguous() for t in (cos, sin))
    if x.dtype != torch.float32 or not packed_heads or not tables_ok or d % 2:
        return None
    out = torch.empty(x.shape, dtype=torch.float32)
    _lib().winnow_rope(
        x.data_ptr(), tokens, heads, d, x.stride(0), cos.data_ptr(), sin.data_ptr(),
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def decode_layers(layers: ctypes.Array[DecodeLayer], step: DecodeStep) -> None:
    """Run every layer of a decode-only step in C (see `winnow_decode_layers`)."""
    _lib().winnow_decode_layers(layers, len(layers), ctypes.byref(step))
