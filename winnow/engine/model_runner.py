"""Turns one scheduled step into model inputs, runs the forward pass, returns logits to sample."""

from __future__ import annotations

import torch

from winnow.distributed.group import cpu_group
from winnow.distributed.step_input import flat_step, run_step, send_step
from winnow.engine.block_tables import BlockTables
from winnow.engine.decode_graphs import DecodeGraphs, graph_batch_sizes, graph_plan_digest
from winnow.engine.host_staging import HostStaging
from winnow.engine.scheduler import ScheduledSequence
from winnow.engine.step_inputs import StepInputs
from winnow.models import AttentionMetadata, LoadedModel, allocate_kv_cache


class ModelRunner:
    """Owns the KV cache tensors and the forward pass of the loaded model.

    The cache is allocated by `allocate_kv_cache` once its size is known (on CUDA after
    `profile_activation_bytes`); `start` then warms up and may route decode-only steps through
    `DecodeGraphs`.
    """

    def __init__(self, loaded: LoadedModel, block_size: int, kv_dtype: torch.dtype) -> None:
        self.model = loaded.model
        self.model_config = loaded.model.layer_config  # this rank's heads (tensor parallel)
        self.device = next(self.model.parameters()).device
        self.block_size = block_size
        self.kv_dtype = kv_dtype
        self.kv_caches: list[torch.Tensor] = []
        self.decode_graphs: DecodeGraphs | None = None
        self.staging = HostStaging(self.device)
        self.block_tables = BlockTables(1, 1, self.staging)

    def size_block_tables(self, max_num_seqs: int, max_model_len: int) -> None:
        """Size the device block tables for the engine's limits (they grow if exceeded)."""
        width = -(-max_model_len // self.block_size)
        self.block_tables = BlockTables(max_num_seqs, width, self.staging)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_cache(
            self.model_config, num_blocks, self.block_size, self.kv_dtype, self.device
        )

    def start(
        self, graph_safe: bool, enforce_eager: bool, max_num_seqs: int, max_model_len: int
    ) -> None:
        """The warm-up forward, then the decode graphs when the attention is `graph_safe` and
        not `enforce_eager` (captured on CUDA; elsewhere the same path runs eagerly).

        Tensor parallel: every rank calls this with the same arguments at the same point (the
        warm-up and the captures are collectives); the ranks first check that they are about
        to build the same graphs, since a mismatch would hang inside NCCL."""
        self.warm_up()
        enabled = graph_safe and not enforce_eager
        capture = self.device.type == "cuda"
        max_blocks = -(-max_model_len // self.block_size)
        tp = self.model.tp
        if tp is not None:
            plan = graph_plan_digest(enabled, graph_batch_sizes(max_num_seqs), max_blocks, capture)
            if not tp.agree(plan):
                raise RuntimeError(
                    f"tensor-parallel rank {tp.rank} plans other decode graphs than its peers "
                    f"(graphs {'on' if enabled else 'off'}, max_num_seqs {max_num_seqs}, "
                    f"{max_blocks} blocks per sequence)"
                )
        if enabled:
            self.use_decode_graphs(max_num_seqs, max_model_len, capture)

    def use_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool) -> None:
        """Decode-only steps of up to max_num_seqs sequences run through static buffers, and
        replay CUDA graphs when `capture` (CUDA only), else the same path eagerly."""
        max_blocks = -(-max_model_len // self.block_size)
        self.decode_graphs = DecodeGraphs(
            self.model, self.kv_caches, max_num_seqs, max_blocks, self.block_size, capture
        )

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One forward over a padding row (slot 0 of block 0, never handed out): kernels that
        compile on first use (Triton's) do it now, before the server says it is ready."""
        attn = AttentionMetadata.build([1], [1], [[0]], self.block_size, self.device)
        token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.model(token, token, self.kv_caches, attn)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampling, vocab] for the sequences whose
        `samples` is true, in scheduled order."""
        if self.model.tp is not None:
            return self._execute_sharded(scheduled)
        self.staging.begin_step()
        inputs = StepInputs.build(scheduled, self.block_size, self.block_tables)
        self.block_tables.upload()
        graphs = self.decode_graphs
        if graphs is not None and inputs.decode_only and len(scheduled) <= graphs.max_batch:
            hidden = self._run_decode_graph(graphs, inputs)
            if len(inputs.sample_rows) < len(scheduled):
                hidden = hidden[self.staging.to_device("rows", inputs.sample_rows)]
            self.staging.end_step()
            return self.model.compute_logits(hidden)
        input_ids, positions, attn, sample_rows = self._prepare(inputs)
        self.staging.end_step()
        hidden = self.model(input_ids, positions, self.kv_caches, attn)
        return self.model.compute_logits(hidden[sample_rows])

    def release(self, seq_id: int) -> None:
        """A sequence finished or was preempted: its block-table row is free for another."""
        self.block_tables.release(seq_id)

    def _step_tables(self, inputs: StepInputs, width: int) -> torch.Tensor:
        """The step's block tables [B, width]: its sequences' rows of the device tables."""
        rows = self.staging.to_device("table-rows", inputs.table_rows)
        return self.block_tables.table[:, :width].index_select(0, rows)

    def _execute_sharded(self, scheduled: list[ScheduledSequence]) -> torch.Tensor:
        """Tensor parallel: the flat step input goes to every worker rank, then all run it."""
        step = flat_step(
            [
                item.seq.token_ids_slice(
                    item.seq.num_computed_tokens, item.seq.num_computed_tokens + item.num_new_tokens
                )
                for item in scheduled
            ],
            [item.seq.num_computed_tokens for item in scheduled],
            [item.seq.block_table for item in scheduled],
            [item.samples for item in scheduled],
            self.block_size,
        )
        graphs = self.decode_graphs
        decode_only = all(item.num_new_tokens == 1 for item in scheduled)
        if graphs is not None and decode_only and len(scheduled) <= graphs.max_batch:
            step.bucket = graphs.bucket(len(scheduled))
        send_step(step, cpu_group())
        return run_step(self.model, self.kv_caches, step, self.block_size, self.device, graphs)

    def _run_decode_graph(self, graphs: DecodeGraphs, inputs: StepInputs) -> torch.Tensor:
        """Decode inputs go from pinned host buffers straight into the graphs' static ones."""
        stage = self.staging.to_host
        return graphs.run(
            stage("ids", inputs.token_ids),
            stage("positions", inputs.positions),
            stage("slots", inputs.slots),
            self._step_tables(inputs, min(graphs.max_blocks_per_seq, self.block_tables.width)),
            stage("seq_lens", inputs.seq_lens),
            inputs.seq_lens.tolist(),
        )

    @torch.inference_mode()
    def profile_activation_bytes(self, num_tokens: int, num_seqs: int) -> int:
        """CUDA: peak bytes beyond the weights that the largest step takes (num_tokens new
        tokens over num_seqs fresh sequences, then logits for each sequence), measured by
        running it on a scratch cache whose own bytes are left out."""
        num_seqs = max(1, min(num_seqs, num_tokens))
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        tables, next_block = [], 1
        for length in lens:
            blocks = -(-length // self.block_size)
            tables.append(list(range(next_block, next_block + blocks)))
            next_block += blocks
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        caches = allocate_kv_cache(
            self.model_config, next_block, self.block_size, self.kv_dtype, self.device
        )
        cache_bytes = sum(cache.numel() * cache.element_size() for cache in caches)
        attn = AttentionMetadata.build(lens, lens, tables, self.block_size, self.device)
        positions = torch.cat([torch.arange(length) for length in lens]).to(self.device)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions, caches, attn)
        last_rows = torch.tensor(lens, device=self.device).cumsum(0) - 1
        self.model.compute_logits(hidden[last_rows])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before - cache_bytes
        del caches, hidden
        torch.cuda.empty_cache()
        return peak

    def _prepare(
        self, inputs: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        to_device = self.staging.to_device
        attn = AttentionMetadata(
            slot_mapping=to_device("slots", inputs.slots),
            block_tables=self._step_tables(inputs, inputs.max_blocks),
            seq_lens_tensor=to_device("seq_lens", inputs.seq_lens),
            query_lens=inputs.query_lens.tolist(),
            seq_lens=inputs.seq_lens.tolist(),
            block_size=self.block_size,
        )
        input_ids = to_device("ids", inputs.token_ids)
        positions = to_device("positions", inputs.positions)
        rows = to_device("rows", inputs.sample_rows)
        return input_ids, positions, attn, rows
