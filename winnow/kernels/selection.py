"""Chooses the kernels once at start-up, from the device, the model dtype and the flags."""

from __future__ import annotations

import importlib.util
import logging

import torch

from winnow.kernels.interface import AttentionBackend, Kernels
from winnow.kernels.torch_attention import TorchAttentionBackend
from winnow.kernels.torch_ops import LayerLoop, TorchPointwise, TorchProjections

logger = logging.getLogger(__name__)


def select_kernels(
    device: torch.device | str, dtype: torch.dtype, cpu_kernels_enabled: bool = True
) -> Kernels:
    """A fresh `Kernels` (it holds per-model state once prepared), logged as "kernels: ...".

    - CPU, fp32, `cpu_kernels_enabled` and the C kernels build here: the C kernels for every
      family (packed projections, norms/RoPE/activation, paged decode attention, fused decode
      layers); their ops fall back to torch for inputs they do not take.
    - CUDA: Triton attention when `winnow.kernels.triton` is installed with triton, else the
      torch reference; torch for the other families (cuBLAS matmuls, fused by CUDA graphs).
    - Otherwise the torch reference.
    """
    device = torch.device(device)
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
    attention, attention_name = _torch_attention()
    if device.type == "cuda":
        attention, attention_name = _cuda_attention()
    kernels = Kernels(
        attention=attention,
        pointwise=TorchPointwise(),
        projections=TorchProjections(),
        layers=LayerLoop(),
        description=f"torch reference, {attention_name} attention",
        decode_graphs=bool(getattr(attention, "cuda_graph_safe", False)),
    )
    if attention_name == "Triton paged":
        _use_triton_pointwise(kernels)
    return _logged(kernels)


def reference_kernels() -> Kernels:
    """The torch reference for every family (any device), without a log line."""
    attention, name = _torch_attention()
    return Kernels(attention, TorchPointwise(), TorchProjections(), LayerLoop(), f"torch ({name})")


def _torch_attention() -> tuple[AttentionBackend, str]:
    return TorchAttentionBackend(), "torch SDPA"


def _cuda_attention() -> tuple[AttentionBackend, str]:
    """Triton's paged attention when its package and triton are importable (imported lazily:
    neither is needed anywhere else)."""
    if importlib.util.find_spec("triton") is None:
        return _torch_attention()
    try:
        triton_kernels = importlib.import_module("winnow.kernels.triton")
    except ImportError:
        return _torch_attention()
    backend: AttentionBackend = triton_kernels.TritonAttentionBackend()
    return backend, "Triton paged"


def _use_triton_pointwise(kernels: Kernels) -> None:
    """Triton's fused norms, SiLU x up, and RoPE inside the KV write (see docs/kernels.md,
    "Launch budget"), next to Triton's attention."""
    fused = importlib.import_module("winnow.kernels.triton.fused")
    kernels.pointwise = fused.TritonPointwise()
    kernels.rope_attention = fused.TritonRopeAttention(kernels.attention)
    kernels.description = "Triton fused pointwise, Triton paged attention"


def _logged(kernels: Kernels) -> Kernels:
    logger.info("kernels: %s", kernels.description)
    return kernels
