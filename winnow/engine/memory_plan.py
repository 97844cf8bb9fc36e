"""How many KV-cache blocks fit, and how long a sequence they hold: pure arithmetic.

On CUDA the budget is what `gpu_memory_utilization` of the card leaves after everything that is
not the cache: the weights and whatever else the process holds (total - free, measured after
loading) plus the peak activations of the largest step (measured by a profiling forward).
On CPU it is `kv_cache_memory_gib`.
"""

from __future__ import annotations

from dataclasses import dataclass


def gpu_kv_budget(
    total_bytes: int, free_bytes: int, peak_activation_bytes: int, gpu_memory_utilization: float
) -> int:
    """Bytes the KV cache may take: total * utilization - (in use after loading + peak
    activations of a step). Negative when nothing is left."""
    in_use = total_bytes - free_bytes
    return int(total_bytes * gpu_memory_utilization) - in_use - peak_activation_bytes


@dataclass(frozen=True)
class KVCachePlan:
    num_blocks: int  # including block 0, which is never handed out (padding points at it)
    max_model_len: int
    capped: bool  # max_model_len was cut to what the cache holds for one sequence


def plan_kv_cache(
    budget_bytes: int,
    bytes_per_block: int,
    block_size: int,
    model_max_len: int,
    requested_max_len: int | None,
    max_num_seqs: int | None,
) -> KVCachePlan:
    """Blocks that fit the budget, at most what `max_num_seqs` full contexts need (None: no
    cap), and the longest sequence they hold: `max_model_len` is the requested length (or the
    model's), cut to (blocks - 1) * block_size where the cache holds less."""
    if bytes_per_block <= 0 or block_size <= 0:
        raise ValueError("block size and bytes per block must be positive")
    wanted_len = min(requested_max_len or model_max_len, model_max_len)
    fit = max(budget_bytes, 0) // bytes_per_block
    blocks_per_seq = -(-wanted_len // block_size)
    if fit < 2:
        raise ValueError(
            f"the memory budget for the KV cache ({budget_bytes / 2**30:.2f} GiB) holds fewer "
            "than 2 blocks: raise --gpu-memory-utilization (or --kv-cache-memory on a CPU), or "
            "lower --max-num-batched-tokens"
        )
    if max_num_seqs is not None:
        fit = min(fit, max_num_seqs * blocks_per_seq + 1)
    num_blocks = fit
    pool_tokens = (num_blocks - 1) * block_size
    return KVCachePlan(num_blocks, min(wanted_len, pool_tokens), pool_tokens < wanted_len)


def agree_on_blocks(plan: KVCachePlan, num_blocks: int, block_size: int) -> KVCachePlan:
    """Tensor parallel: every rank's cache holds the same block ids, so the pool is the
    smallest rank's `num_blocks`; max_model_len shrinks with it where it no longer fits."""
    if num_blocks >= plan.num_blocks:
        return plan
    pool_tokens = (num_blocks - 1) * block_size
    return KVCachePlan(
        num_blocks,
        min(plan.max_model_len, pool_tokens),
        plan.capped or pool_tokens < plan.max_model_len,
    )
