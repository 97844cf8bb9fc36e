"""TritonAttentionBackend: the paged-attention backend for CUDA, built from this package's kernels.

On a CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1 set before the kernels are
imported), which is how the test suite checks it against the torch reference.
"""

from __future__ import annotations

import functools
import itertools

import torch

from winnow.kernels.attention_metadata import AttentionMetadata
from winnow.kernels.triton.decode import paged_decode, split_count
from winnow.kernels.triton.kv_write import write_kv
from winnow.kernels.triton.prefill import paged_prefill

# Decode programs to aim for when the device does not say how many cores it has.
DEFAULT_TARGET_PROGRAMS = 256


class TritonAttentionBackend:
    """Writes the step's k/v into the cache, then attends reading the cache in place:
    - a decode-only step: the split-context decode kernel;
    - any other step: the varlen kernel over every sequence (fresh prompts, chunks after a cached
      prefix, and the step's single-token decodes in the same launch).

    `decode_splits` fixes the number of context splits of decode steps (e.g. for a captured
    CUDA graph, whose launch grid cannot change); None picks it per step from the longest
    context and the batch size.
    """

    def __init__(
        self, device: torch.device | str = "cuda", decode_splits: int | None = None
    ) -> None:
        self.device = torch.device(device)
        self.decode_splits = decode_splits

    @functools.cached_property
    def target_programs(self) -> int:
        """Decode programs to aim for: four per GPU core (asked on first use, so choosing this
        backend touches no GPU)."""
        if self.device.type != "cuda":
            return DEFAULT_TARGET_PROGRAMS
        return 4 * torch.cuda.get_device_properties(self.device).multi_processor_count

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the step's flat tokens -> output [T, Hq, D]."""
        write_kv(kv_cache, k, v, attn.slot_mapping)
        return self.attend(q, kv_cache, attn, sliding_window)

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Attention alone, over a cache that already holds the step's k/v -> [T, Hq, D]."""
        if attn.is_decode_only:
            splits = self.decode_splits or self._decode_splits(attn, kv_cache, sliding_window)
            return paged_decode(
                q, kv_cache, attn.block_tables, attn.seq_lens_tensor, sliding_window, splits
            )
        return paged_prefill(
            q, kv_cache, attn.block_tables, _query_starts(attn), attn.seq_lens_tensor,
            sliding_window,
        )  # fmt: skip

    def _decode_splits(
        self, attn: AttentionMetadata, kv_cache: torch.Tensor, sliding_window: int | None
    ) -> int:
        context = attn.max_seq_len
        if sliding_window is not None:
            context = min(context, sliding_window)
        num_kv_heads = kv_cache.shape[-2]
        return split_count(len(attn.seq_lens), num_kv_heads, context, self.target_programs)


def _query_starts(attn: AttentionMetadata) -> torch.Tensor:
    """[B + 1] offsets of each sequence's new tokens in the step, built once per step."""
    key = "triton-query-starts"
    if key not in attn.memo:
        starts = list(itertools.accumulate(attn.query_lens, initial=0))
        attn.memo[key] = torch.tensor(starts, dtype=torch.int64, device=attn.block_tables.device)
    starts_tensor = attn.memo[key]
    assert isinstance(starts_tensor, torch.Tensor)
    return starts_tensor
