"""Winnow's C decode-attention kernel vs the PyTorch path (gather the blocks, one batched SDPA).

    .venv/bin/python bench/decode_attention.py --runs 30

One decode step's attention for one layer of demo-large's shape (16 query heads, 8 kv heads of
64) at batch B and context length L, the sequences' blocks scattered at random through a pool of
`--pool-gib` (larger than the CPU's caches, as a served KV pool is), for each cache dtype. Prints
ms per layer and the ratio to the PyTorch path on the same cache in the same run (medians of
`--runs`, fresh block tables each run). Each timed call follows an untimed one on the same step
(so that the per-step gather plans are built, as the first layer of a step builds them for all)
and a read of `--flush-gib` that evicts the step's blocks from the caches again.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from winnow.kernels import AttentionMetadata
from winnow.kernels.cpu import cpu_kernels
from winnow.kernels.cpu.ops import CpuAttentionBackend
from winnow.kernels.torch_attention import TorchAttentionBackend

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 64, 16
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def scattered_step(batch: int, length: int, pool_blocks: int) -> AttentionMetadata:
    """A decode-only step: every sequence's last token, its blocks drawn at random from the pool."""
    per_seq = -(-length // BLOCK_SIZE)
    blocks = torch.randperm(pool_blocks)[: batch * per_seq].view(batch, per_seq).tolist()
    return AttentionMetadata.build([1] * batch, [length] * batch, blocks, BLOCK_SIZE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=192)
    parser.add_argument("--pool-gib", type=float, default=1.0)
    parser.add_argument("--flush-gib", type=float, default=0.5)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("the CPU kernels are not available on this machine")
    kernel, reference = CpuAttentionBackend(), TorchAttentionBackend()
    flush = torch.zeros(int(args.flush_gib * 2**30) // 4)
    print(
        f"{torch.get_num_threads()} threads; batch {args.batch} x {args.length} positions,"
        f" pool {args.pool_gib:g} GiB"
    )
    print(f"{'cache':>9} {'winnow ms':>10} {'torch ms':>9} {'ratio':>6}")
    for name in args.dtypes:
        dtype = DTYPES[name]
        block_bytes = 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * dtype.itemsize
        pool_blocks = int(args.pool_gib * 2**30 // block_bytes)
        cache = torch.randn(2, pool_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM).to(dtype)
        q = torch.randn(args.batch, HEADS, HEAD_DIM)
        times: dict[str, list[float]] = {"winnow": [], "torch": []}
        for _ in range(args.runs):
            attn = scattered_step(args.batch, args.length, pool_blocks)
            for label, backend in (("winnow", kernel), ("torch", reference)):
                backend.decode(q, cache, attn, None, None)
                flush.sum()
                start = time.perf_counter()
                backend.decode(q, cache, attn, None, None)
                times[label].append(time.perf_counter() - start)
        mine, base = (statistics.median(times[label]) for label in ("winnow", "torch"))
        print(f"{name:>9} {mine * 1e3:10.3f} {base * 1e3:9.3f} {base / mine:5.2f}x")
        del cache


if __name__ == "__main__":
    main()
