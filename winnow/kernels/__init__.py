"""kernels: the backends that run a model's operations (torch reference, C CPU kernels, Triton on
CUDA), one implementation per operation family, chosen once at start-up. Knows nothing about
models or requests."""

from winnow.kernels.attention_metadata import AttentionMetadata
from winnow.kernels.interface import AttentionBackend, Kernels
from winnow.kernels.selection import reference_kernels, select_kernels

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "Kernels",
    "reference_kernels",
    "select_kernels",
]
