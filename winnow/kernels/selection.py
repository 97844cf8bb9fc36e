"""Chooses the kernels once at start-up, from the device, the model dtype and the flags."""

from __future__ import annotations

import importlib.util
import logging

import torch

from winnow.kernels.interface import AttentionBackend, Kernels
from winnow.kernels.torch_attention import TorchAttentionBackend
from winnow.kernels.torch_ops import LayerLoop, TorchPointwise, TorchProjections

logger = logging.getLogger(__name__)

KERNEL_CHOICES = ("auto", "torch", "triton")


def select_kernels(
    device: torch.device | str,
    dtype: torch.dtype,
    cpu_kernels_enabled: bool = True,
    choice: str = "auto",
) -> Kernels:
    """A fresh `Kernels` (it holds per-model state once prepared), logged as "kernels: ...".

    With `choice` "auto":
    - CPU, fp32, `cpu_kernels_enabled` and the C kernels build here: the C kernels for every
      family (packed projections, norms/RoPE/activation, paged decode attention, fused decode
      layers); their ops fall back to torch for inputs they do not take.
    - CUDA: Triton attention when `winnow.kernels.triton` is installed with triton, else the
      torch reference; torch for the other families (cuBLAS matmuls, fused by CUDA graphs).
    - Otherwise the torch reference.
    "torch" takes the torch reference on any device; "triton" the CUDA path's kernels on any
    device (on a CPU they run under Triton's interpreter, which must be on: TRITON_INTERPRET=1).
    Decode steps run through `DecodeGraphs` when the attention is `cuda_graph_safe`.
    """
    device = torch.device(device)
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {choice!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    if choice == "triton":
        return _logged(_with_attention(*_triton_attention(device)))
    if choice == "torch":
        return _logged(_with_attention(*_torch_attention()))
    if device.type == "cpu" and cpu_kernels_enabled and dtype == torch.float32:
        from winnow.kernels.cpu import cpu_kernels

        if cpu_kernels.available():
            from winnow.kernels.cpu.ops import (
                CpuAttentionBackend,
                CpuPointwise,
                DecodeStackLayers,
                PackedProjections,
            )

            kernels = Kernels(
                attention=CpuAttentionBackend(),
                pointwise=CpuPointwise(),
                projections=PackedProjections(),
                layers=DecodeStackLayers(),
                description="C CPU kernels (packed projections, paged decode, fused decode)",
            )
            return _logged(kernels)
    if device.type == "cuda":
        return _logged(_with_attention(*_cuda_attention(device)))
    return _logged(_with_attention(*_torch_attention()))


def _with_attention(attention: AttentionBackend, attention_name: str) -> Kernels:
    """Torch for every family but attention; beside Triton's attention, Triton's fused
    pointwise kernels too."""
    kernels = Kernels(
        attention=attention,
        pointwise=TorchPointwise(),
        projections=TorchProjections(),
        layers=LayerLoop(),
        description=f"torch reference, {attention_name} attention",
        decode_graphs=bool(getattr(attention, "cuda_graph_safe", False)),
    )
    if attention_name.startswith("Triton paged"):
        _use_triton_pointwise(kernels, attention_name)
    return kernels


def _use_triton_pointwise(kernels: Kernels, attention_name: str) -> None:
    """Triton's fused norms, SiLU x up, and RoPE inside the KV write (see docs/kernels.md,
    "Launch budget")."""
    fused = importlib.import_module("winnow.kernels.triton.fused")
    kernels.pointwise = fused.TritonPointwise()
    kernels.rope_attention = fused.TritonRopeAttention(kernels.attention)
    kernels.description = f"Triton fused pointwise, {attention_name} attention"


def reference_kernels() -> Kernels:
    """The torch reference for every family (any device), without a log line."""
    attention, name = _torch_attention()
    return Kernels(attention, TorchPointwise(), TorchProjections(), LayerLoop(), f"torch ({name})")


def _torch_attention() -> tuple[AttentionBackend, str]:
    return TorchAttentionBackend(), "torch SDPA"


def _cuda_attention(device: torch.device) -> tuple[AttentionBackend, str]:
    """Triton's paged attention when its package and triton are importable (imported lazily:
    neither is needed anywhere else)."""
    if importlib.util.find_spec("triton") is None:
        return _torch_attention()
    try:
        triton_kernels = importlib.import_module("winnow.kernels.triton")
    except ImportError:
        return _torch_attention()
    backend: AttentionBackend = triton_kernels.TritonAttentionBackend(device)
    return backend, "Triton paged"


def _triton_attention(device: torch.device) -> tuple[AttentionBackend, str]:
    """Triton's paged attention, or a ValueError saying why it cannot run here."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("--kernels triton needs the triton package (pip install triton)")
    if device.type != "cuda" and not importlib.import_module("triton").knobs.runtime.interpret:
        raise ValueError(
            f"--kernels triton on {device.type} runs only under Triton's interpreter: "
            "set TRITON_INTERPRET=1 (a test mode, far slower than --kernels auto)"
        )
    triton_kernels = importlib.import_module("winnow.kernels.triton")
    backend: AttentionBackend = triton_kernels.TritonAttentionBackend(device)
    name = "Triton paged" if device.type == "cuda" else "Triton paged (interpreted)"
    return backend, name


def _logged(kernels: Kernels) -> Kernels:
    logger.info("kernels: %s", kernels.description)
    return kernels
