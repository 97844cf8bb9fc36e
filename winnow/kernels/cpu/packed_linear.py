"""nn.Linear on CPU weights repacked for the AVX2/AVX-512 kernel in `cpu_kernels`."""

from __future__ import annotations

import torch
from torch import nn

from winnow.kernels.cpu import cpu_kernels


class PackedLinear(nn.Module):
    """y = x @ weight.T + bias (fp32 in and out) with the weight held only in packed panels of
    its own dtype (fp32, or fp16 / bf16 widened exactly as the kernel loads it)."""

    packed: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", cpu_kernels.pack_weight(weight.detach()))
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.stride(1) == 1:  # the model's flat [tokens, features] rows
            return cpu_kernels.linear(x, self.packed, self.out_features, self.bias)
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = cpu_kernels.linear(rows, self.packed, self.out_features, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(module: nn.Module, weight_dtype: torch.dtype) -> None:
    """Replace every nn.Linear inside `module` (fp32, on the CPU) by a PackedLinear whose panels
    hold the weight as `weight_dtype`, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight.to(weight_dtype), child.bias))
        else:
            pack_linears(child, weight_dtype)


def lossless_weight_dtype(weights: list[torch.Tensor]) -> torch.dtype:
    """bf16 or fp16 when every weight holds exactly in it (a 16-bit checkpoint loaded as fp32),
    else fp32: 16-bit panels then give the fp32 panels' results from half the bytes."""
    for dtype in (torch.bfloat16, torch.float16):
        if all(torch.equal(w.to(dtype).float(), w) for w in weights):
            return dtype
    return torch.float32
