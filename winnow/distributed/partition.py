"""Which slice of each weight and of the KV heads a rank holds: pure arithmetic.

Attention heads and the MLP's intermediate size split evenly; KV heads split when there are
at least as many as ranks, else each KV head is replicated on `size / num_kv_heads` ranks (the
ranks whose query heads read it). The vocabulary splits into equal padded shards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from winnow.models.config import ModelConfig


def check_divisible(config: ModelConfig, size: int) -> None:
    """Refuse a model this tensor-parallel size cannot split, naming the numbers."""
    problems = []
    if config.num_heads % size:
        problems.append(f"{config.num_heads} attention heads")
    if config.intermediate_size % size:
        problems.append(f"intermediate size {config.intermediate_size}")
    kv = config.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        problems.append(f"{kv} KV heads (must divide by, or divide, the size)")
    if problems:
        raise ValueError(
            f"--tensor-parallel-size {size} does not divide this model's "
            f"{', '.join(problems)}; choose a size that divides them"
        )


@dataclass(frozen=True)
class Partition:
    """Rank `rank` of `size` over a model `config`."""

    config: ModelConfig
    rank: int
    size: int

    @property
    def num_heads(self) -> int:
        return self.config.num_heads // self.size

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.config.num_kv_heads // self.size)

    @property
    def kv_head_start(self) -> int:
        """The first KV head this rank holds (replicated heads: the one its query heads read)."""
        kv = self.config.num_kv_heads
        if kv >= self.size:
            return self.rank * self.num_kv_heads
        return self.rank // (self.size // kv)

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size // self.size

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.config.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    @property
    def vocab_rows(self) -> int:
        """Real (unpadded) vocabulary rows of this rank's shard."""
        return max(0, min(self.vocab_per_rank, self.config.vocab_size - self.vocab_start))

    def local_config(self) -> ModelConfig:
        """The config this rank's layers are built from: its heads and intermediate slice
        (the vocabulary stays whole: the vocab-parallel layers split it themselves)."""
        return dataclasses.replace(
            self.config,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
        )

    def source_slice(self, hf_module: str) -> tuple[int, int, int] | None:
        """(dim, start, length) of a checkpoint tensor of `hf_module` this rank reads; None:
        the whole tensor (norms, and the biases of row-parallel layers)."""
        head_dim = self.config.head_dim
        if hf_module == "self_attn.q_proj":
            return 0, self.rank * self.num_heads * head_dim, self.num_heads * head_dim
        if hf_module in ("self_attn.k_proj", "self_attn.v_proj"):
            return 0, self.kv_head_start * head_dim, self.num_kv_heads * head_dim
        if hf_module == "self_attn.o_proj":
            return 1, self.rank * self.num_heads * head_dim, self.num_heads * head_dim
        if hf_module in ("mlp.gate_proj", "mlp.up_proj"):
            return 0, self.rank * self.intermediate_size, self.intermediate_size
        if hf_module == "mlp.down_proj":
            return 1, self.rank * self.intermediate_size, self.intermediate_size
        if hf_module in ("embed_tokens", "lm_head"):
            return 0, self.vocab_start, self.vocab_rows
        return None
