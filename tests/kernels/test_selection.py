"""Kernel selection: one implementation per operation family, chosen from device, dtype, flags."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch

from winnow.kernels import select_kernels
from winnow.kernels.cpu import cpu_kernels
from winnow.kernels.torch_attention import TorchAttentionBackend
from winnow.kernels.torch_ops import LayerLoop, TorchPointwise, TorchProjections
from winnow.models import load_model

needs_cpu_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason="needs AVX2 and a C compiler"
)


@needs_cpu_kernels
def test_fp32_cpu_gets_the_c_kernels_and_logs_the_choice(caplog: pytest.LogCaptureFixture) -> None:
    from winnow.kernels.cpu.ops import (
        CpuAttentionBackend,
        CpuPointwise,
        DecodeStackLayers,
        PackedProjections,
    )

    with caplog.at_level(logging.INFO, logger="winnow.kernels.selection"):
        kernels = select_kernels("cpu", torch.float32)
    assert isinstance(kernels.attention, CpuAttentionBackend)
    assert isinstance(kernels.pointwise, CpuPointwise)
    assert isinstance(kernels.projections, PackedProjections)
    assert isinstance(kernels.layers, DecodeStackLayers)
    assert [r.getMessage() for r in caplog.records] == [f"kernels: {kernels.description}"]
    assert "C CPU kernels" in kernels.description


@pytest.mark.parametrize(
    ("dtype", "enabled"), [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)]
)
def test_torch_reference_when_the_c_kernels_do_not_apply(dtype: torch.dtype, enabled: bool) -> None:
    """--no-cpu-kernels, or a 16-bit model on the CPU (the C kernels take fp32 activations)."""
    kernels = select_kernels("cpu", dtype, cpu_kernels_enabled=enabled)
    assert type(kernels.attention) is TorchAttentionBackend
    assert type(kernels.pointwise) is TorchPointwise
    assert isinstance(kernels.projections, TorchProjections)
    assert type(kernels.layers) is LayerLoop


def test_cuda_takes_triton_attention_when_present() -> None:
    """Chosen without touching a GPU: Triton's backend when its package imports, else torch."""
    kernels = select_kernels("cuda", torch.bfloat16)
    has_triton = importlib.util.find_spec("triton") is not None
    has_backend = has_triton and importlib.util.find_spec("winnow.kernels.triton") is not None
    if has_backend:
        assert type(kernels.attention).__name__ == "TritonAttentionBackend"
        assert type(kernels.pointwise).__name__ == "TritonPointwise"
        assert kernels.rope_attention is not None
        assert "Triton" in kernels.description
        assert kernels.decode_graphs  # graph-safe: the engine captures decode steps
    else:
        assert type(kernels.attention) is TorchAttentionBackend
        assert not kernels.decode_graphs
        assert type(kernels.pointwise) is TorchPointwise


def test_forced_choices() -> None:
    """--kernels torch keeps any device on the reference; an unknown choice is refused."""
    for device in ("cpu", "cuda"):
        kernels = select_kernels(device, torch.float32, choice="torch")
        assert type(kernels.attention) is TorchAttentionBackend
        assert not kernels.decode_graphs
    with pytest.raises(ValueError, match="unknown kernels 'fast'"):
        select_kernels("cpu", torch.float32, choice="fast")


def test_every_module_of_a_loaded_model_shares_its_kernels(demo_model_dir) -> None:
    loaded = load_model(str(demo_model_dir), cpu_kernels_enabled=False)
    holders = [m for m in loaded.model.modules() if hasattr(m, "kernels")]
    assert len(holders) > 3 * loaded.config.num_layers
    assert all(m.kernels is loaded.kernels for m in holders)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_on_a_cpu_needs_the_interpreter() -> None:
    """--kernels triton on a CPU without TRITON_INTERPRET=1 says what to set (in a process of
    its own: the interpreter is switched on or off when the kernels are imported)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import torch, winnow.kernels as k\n"
    code += "k.select_kernels('cpu', torch.float32, True, 'triton')"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "set TRITON_INTERPRET=1" in result.stderr.splitlines()[-1]
