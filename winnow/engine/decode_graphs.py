"""Decode steps replayed from CUDA graphs, one per batch size of a ladder.

A decode step of an 8B model launches about a thousand kernels; captured once per batch size,
it replays with one launch. A graph reads and writes fixed addresses, so every per-step input
lives in a static buffer sized for the largest batch; a batch runs in the smallest captured size
that holds it, its extra rows padded: they write their key/value into slot 0 of block 0 (never
handed out by the block manager) and attend over that one slot, and their outputs are dropped.

Every step of a bucket launches the same kernels with the same grids: an attention backend
sizes them from `graph_max_seq_len` (max_model_len in whole blocks), never from the lengths the
step brings, which it reads from the static `seq_lens` on the device.

With `capture=False` the same buffers, buckets, padding and slicing run the model eagerly:
how the CPU tests (and `--kernels triton` on a CPU) run this path.
"""

from __future__ import annotations

import logging
import zlib

import torch

from winnow.models import AttentionMetadata
from winnow.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs, and max_num_seqs itself."""
    sizes = {size for size in (1, 2, 4) if size < max_num_seqs}
    sizes.update(range(8, max_num_seqs + 1, 8))
    sizes.add(max_num_seqs)
    return sorted(sizes)


def capture_order(sizes: list[int]) -> list[int]:
    """Largest first: the smaller graphs then fit in the pool the largest one left. At tensor
    parallel every rank captures in this order, so the collectives inside the graphs pair up."""
    return sorted(sizes, reverse=True)


def graph_plan_digest(
    enabled: bool, sizes: list[int], max_blocks_per_seq: int, capture: bool
) -> int:
    """What a rank is about to build, as one number the ranks compare before capturing."""
    return zlib.crc32(repr((enabled, sizes, max_blocks_per_seq, capture)).encode())


class DecodeGraphs:
    """Static inputs, and a captured graph (or the eager forward) per batch size.

    `replays` and `trace` (a running CRC of the bucket sizes run) let the tensor-parallel ranks
    check at a clean stop that they replayed the same buckets in the same order."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        capture: bool,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.capture = capture
        device = kv_caches[0].device
        largest = self.sizes[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros_like(self.input_ids)
        self.slot_mapping = torch.zeros_like(self.input_ids)
        self.seq_lens = torch.ones_like(self.input_ids)
        self.block_tables = torch.zeros(
            largest, max_blocks_per_seq, dtype=torch.long, device=device
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0
        self.trace = 0
        if capture:
            self._capture_all()
        else:
            logger.info("decode: static buffers for batch sizes %s, run eagerly", self.sizes)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]

    def bucket(self, batch: int) -> int:
        """The smallest batch size of the ladder that holds `batch` rows."""
        for size in self.sizes:
            if size >= batch:
                return size
        raise ValueError(f"batch {batch} exceeds the largest graph ({self.max_batch})")

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        host_seq_lens: list[int],
        size: int | None = None,
    ) -> torch.Tensor:
        """One decode token per sequence ([B] inputs, block tables [B, <= max_blocks_per_seq])
        -> final hidden states [B, hidden] (a view into the graph's output: use it before the
        next step). `size`: the bucket to run (tensor parallel: the one rank 0 chose); by
        default the smallest that holds B."""
        batch, width = block_tables.shape
        if size is None:
            size = self.bucket(batch)
        elif size not in self.sizes or size < batch:
            raise ValueError(f"no decode bucket {size} for a batch of {batch} in {self.sizes}")
        self.replays += 1
        self.trace = zlib.crc32(size.to_bytes(4, "little"), self.trace)
        self.input_ids[:batch].copy_(input_ids, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(slot_mapping, non_blocking=True)
        self.block_tables[:batch, :width].copy_(block_tables, non_blocking=True)
        self.block_tables[:batch, width:].zero_()
        self.seq_lens[:batch].copy_(seq_lens, non_blocking=True)
        self._pad(batch, size)
        if self.capture:
            self.graphs[size].replay()
            return self.outputs[size][:batch]
        host = host_seq_lens + [1] * (size - batch)
        return self._forward(size, host)[:batch]

    def _pad(self, start: int, end: int) -> None:
        """Rows start..end write to slot 0 (block 0) and read only it."""
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        self.slot_mapping[start:end].zero_()
        self.block_tables[start:end].zero_()
        self.seq_lens[start:end].fill_(1)

    def _forward(self, size: int, host_seq_lens: list[int]) -> torch.Tensor:
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens_tensor=self.seq_lens[:size],
            query_lens=[1] * size,
            seq_lens=host_seq_lens,
            block_size=self.block_size,
            graph_max_seq_len=self.max_blocks_per_seq * self.block_size,
        )
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, attn)

    def _capture_all(self) -> None:
        """Largest size first, all graphs in one memory pool (only one runs at a time). Every
        row is a padding row while capturing; a backend that allows graphs (`Kernels.decode_graphs`)
        then reads no host length (see `AttentionMetadata.graph_max_seq_len`)."""
        pool = None
        for size in capture_order(self.sizes):
            self._pad(0, size)
            host = [1] * size
            for _ in range(2):  # warm-up: lazy initialisation, kernel compilation
                self._forward(size, host)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size, host)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("CUDA graphs: decode captured for batch sizes %s", self.sizes)
