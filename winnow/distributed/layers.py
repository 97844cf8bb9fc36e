"""Column-, row- and vocabulary-parallel layers: each rank holds its slice of the weight.

A column-parallel projection (QKV, gate/up) keeps its slice of the output features and needs
no communication; the row-parallel one after it (o_proj, down_proj) multiplies its slice of the
input features and all-reduces the partial sums, adding the bias once, after the sum. The
embedding and the LM head split the vocabulary into equal shards (the last one padded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from winnow.distributed.group import TensorParallel
from winnow.distributed.partition import Partition


class ColumnParallelLinear(nn.Linear):
    """`out_features` is this rank's slice; the output stays sharded for the next layer."""


class RowParallelLinear(nn.Linear):
    """`in_features` is this rank's slice of the input; the output is summed over the ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(F.linear(x, self.weight))
        if self.bias is not None:
            out.add_(self.bias)
        return out


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding; ids outside them contribute zeros to the sum."""

    def __init__(self, partition: Partition, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(partition.vocab_per_rank, hidden_size))
        self.start = partition.vocab_start
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(nn.Module):
    """This rank's vocabulary rows of an untied LM head (a tied one is the vocab-parallel
    embedding's weight: `vocab_parallel_logits` over it)."""

    def __init__(self, partition: Partition, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(partition.vocab_per_rank, hidden_size))


def vocab_parallel_logits(
    hidden: torch.Tensor, weight: torch.Tensor, tp: TensorParallel, vocab_size: int
) -> torch.Tensor:
    """Logits over this rank's vocabulary rows `weight`, gathered to rank 0: there float32
    [N, vocab_size]; on the other ranks their own shard's [N, vocab / size]."""
    local = F.linear(hidden, weight).float()
    gathered = tp.gather_last_dim(local)
    return local if gathered is None else gathered[:, :vocab_size]
