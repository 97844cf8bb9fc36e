"""Turns one scheduled step into model inputs, runs the forward pass, returns logits to sample."""

from __future__ import annotations

import numpy as np
import torch

from winnow.engine.scheduler import ScheduledSequence
from winnow.models import AttentionMetadata, LoadedModel, allocate_kv_cache


class ModelRunner:
    """Owns the KV cache tensors and the forward pass of the loaded model."""

    def __init__(
        self, loaded: LoadedModel, num_blocks: int, block_size: int, kv_dtype: torch.dtype
    ) -> None:
        self.model = loaded.model
        self.device = next(self.model.parameters()).device
        self.block_size = block_size
        self.kv_caches = allocate_kv_cache(
            loaded.config, num_blocks, block_size, kv_dtype, self.device
        )

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampling, vocab] for the sequences whose
        `samples` is true, in scheduled order."""
        input_ids, positions, attn, sample_rows = self._prepare(scheduled)
        hidden = self.model(input_ids, positions, self.kv_caches, attn)
        return self.model.compute_logits(hidden[sample_rows])

    def _prepare(
        self, scheduled: list[ScheduledSequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        block_size = self.block_size
        token_ids: list[int] = []
        position_chunks: list[np.ndarray] = []
        slot_chunks: list[np.ndarray] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        max_blocks = max(len(s.seq.block_table) for s in scheduled)
        block_tables = np.zeros((len(scheduled), max_blocks), dtype=np.int64)
        num_tokens = 0
        for row, item in enumerate(scheduled):
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            token_ids.extend(seq.token_ids_slice(start, end))
            table = np.asarray(seq.block_table, dtype=np.int64)
            block_tables[row, : len(table)] = table
            positions = np.arange(start, end, dtype=np.int64)
            position_chunks.append(positions)
            slot_chunks.append(table[positions // block_size] * block_size + positions % block_size)
            query_lens.append(item.num_new_tokens)
            seq_lens.append(end)
            num_tokens += item.num_new_tokens
            if item.samples:
                sample_rows.append(num_tokens - 1)
        attn = AttentionMetadata(
            slot_mapping=self._to_device(np.concatenate(slot_chunks)),
            block_tables=self._to_device(block_tables),
            seq_lens_tensor=self._to_device(np.asarray(seq_lens, dtype=np.int64)),
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_size=block_size,
        )
        input_ids = self._to_device(np.asarray(token_ids, dtype=np.int64))
        positions_tensor = self._to_device(np.concatenate(position_chunks))
        rows = self._to_device(np.asarray(sample_rows, dtype=np.int64))
        return input_ids, positions_tensor, attn, rows

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)
