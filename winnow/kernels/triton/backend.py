"""TritonAttentionBackend: the paged-attention backend for CUDA, built from this package's kernels.

On a CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1 set before the kernels are
imported): how the test suite checks it against the torch reference, and how `--kernels triton`
runs the whole engine on the CUDA path's kernels without a GPU.
"""

from __future__ import annotations

import functools
import itertools

import torch

from winnow.kernels.attention_metadata import AttentionMetadata
from winnow.kernels.triton.decode import paged_decode, rope_paged_decode, split_count
from winnow.kernels.triton.kv_write import write_kv
from winnow.kernels.triton.prefill import paged_prefill
from winnow.kernels.triton.warm_up import layout_key, warm_up

# Decode programs to aim for when the device does not say how many cores it has.
DEFAULT_TARGET_PROGRAMS = 256


class TritonAttentionBackend:
    """Writes the step's k/v into the cache, then attends reading the cache in place:
    - a decode-only step: the split-context decode kernel;
    - any other step: the varlen kernel over every sequence (fresh prompts, chunks after a cached
      prefix, and the step's single-token decodes in the same launch).
    `rope_decode` is a decode-only step with RoPE and the KV write inside the decode launch.

    Decode launches read every length from `seq_lens_tensor`; their grid depends only on the
    batch size and, in a step a CUDA graph replays, on `graph_max_seq_len`: so decode steps may
    be captured (`cuda_graph_safe`). The first forward over a new tensor layout launches every
    kernel variant once (`warm_up`), so none compiles while serving.
    """

    cuda_graph_safe = True

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self._warm_layouts: set[tuple[object, ...]] = set()

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
        self.warm(q, k, v, kv_cache)
        write_kv(kv_cache, k, v, attn.slot_mapping)
        return self.attend(q, kv_cache, attn, sliding_window)

    def warm(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Launch every kernel variant once for a tensor layout not seen before: with `rope`
        (cos, sin), the variants of a forward that hands over un-rotated q and k."""
        layout = layout_key(q, k, v, kv_cache, *(rope or ()))
        if layout not in self._warm_layouts:
            warm_up(q, k, v, kv_cache, rope)
            self._warm_layouts.add(layout)

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Attention alone, over a cache that already holds the step's k/v -> [T, Hq, D]."""
        if attn.is_decode_only:
            splits = self.decode_splits(q.shape[0], attn, kv_cache, sliding_window)
            return paged_decode(
                q, kv_cache, attn.block_tables, attn.seq_lens_tensor, sliding_window, splits
            )
        return paged_prefill(
            q, kv_cache, attn.block_tables, _query_starts(attn), attn.seq_lens_tensor,
            sliding_window,
        )  # fmt: skip

    def rope_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """A decode-only step's RoPE, KV write and attention in one launch (+ the merge of its
        splits): un-rotated q [B, Hq, D], k/v [B, Hkv, D] -> output [B, Hq, D]."""
        splits = self.decode_splits(q.shape[0], attn, kv_cache, sliding_window)
        return rope_paged_decode(
            q, k, v, cos, sin, kv_cache, attn.slot_mapping, attn.block_tables,
            attn.seq_lens_tensor, sliding_window, splits,
        )  # fmt: skip

    def decode_splits(
        self,
        batch: int,
        attn: AttentionMetadata,
        kv_cache: torch.Tensor,
        sliding_window: int | None,
    ) -> int:
        """Context splits of a decode step: from the longest host length, or in a graph-replayed
        step from `graph_max_seq_len` (a captured launch grid is fixed, so it is cut for the
        longest context it may meet; shorter ones leave some splits empty)."""
        bound = attn.graph_max_seq_len
        context = max(attn.seq_lens) if bound is None else bound
        if sliding_window is not None:
            context = min(context, sliding_window)
        num_kv_heads = kv_cache.shape[-2]
        return split_count(batch, num_kv_heads, context, self.target_programs)


def _query_starts(attn: AttentionMetadata) -> torch.Tensor:
    """[B + 1] offsets of each sequence's new tokens in the step, built once per step."""
    key = "triton-query-starts"
    if key not in attn.memo:
        starts = list(itertools.accumulate(attn.query_lens, initial=0))
        attn.memo[key] = torch.tensor(starts, dtype=torch.int64, device=attn.block_tables.device)
    starts_tensor = attn.memo[key]
    assert isinstance(starts_tensor, torch.Tensor)
    return starts_tensor
