"""Triton kernels for paged attention on CUDA (KV write, split-context decode, varlen prefill)."""

from winnow.kernels.triton.backend import TritonAttentionBackend

__all__ = ["TritonAttentionBackend"]
