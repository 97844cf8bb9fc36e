"""Winnow's packed projection kernel vs torch's F.linear on every demo-large projection.

    .venv/bin/python bench/projections.py --runs 7
    .venv/bin/python bench/projections.py --runs 7 --weight-dtype bfloat16

For each batch size M, times one pass over the model's 33 projections (8 layers of fused QKV,
output, fused gate/up and down, then the output head) back to back, as a decode step at batch M
runs them, and prints ms, GFLOP/s and the ratio to F.linear on the same weights in the same run
(medians of `--runs`). With `--weight-dtype bfloat16` (or float16) the weights are 16-bit values:
Winnow keeps them in 16-bit panels, F.linear gets them as fp32, the exact computation both do.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from winnow.kernels.cpu import cpu_kernels

# (out_features, in_features) of demo-large's projections, in the order a forward runs them
LAYER = [(2048, 1024), (1024, 1024), (5632, 1024), (1024, 2816)]
SHAPES = LAYER * 8 + [(32768, 1024)]


def median_seconds(run: Callable[[], None], runs: int) -> float:
    run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def packed_pass(packed: list[torch.Tensor], inputs: dict[int, torch.Tensor]) -> None:
    for weight, (n, k) in zip(packed, SHAPES, strict=True):
        cpu_kernels.linear(inputs[k], weight, n, None)


def torch_pass(weights: list[torch.Tensor], inputs: dict[int, torch.Tensor]) -> None:
    for weight, (_, k) in zip(weights, SHAPES, strict=True):
        F.linear(inputs[k], weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 24, 32, 64, 128])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--weight-dtype", default="float32", choices=["float32", "bfloat16", "float16"]
    )
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("the CPU kernels are not available on this machine")
    dtype = getattr(torch, args.weight_dtype)
    weights = [torch.randn(n, k).to(dtype).float() for n, k in SHAPES]
    packed = [cpu_kernels.pack_weight(w.to(dtype)) for w in weights]
    megabytes = sum(p.numel() * p.element_size() for p in packed) / 1e6
    print(f"{torch.get_num_threads()} threads; {args.weight_dtype} panels, {megabytes:.0f} MB")
    print(
        f"{'M':>5} {'winnow ms':>10} {'GFLOP/s':>8} {'F.linear ms':>12} {'GFLOP/s':>8} {'ratio':>6}"
    )
    for m in args.batch_sizes:
        inputs = {k: torch.randn(m, k) for k in {k for _, k in SHAPES}}
        flops = sum(2 * m * n * k for n, k in SHAPES)
        mine = median_seconds(lambda x=inputs: packed_pass(packed, x), args.runs)
        base = median_seconds(lambda x=inputs: torch_pass(weights, x), args.runs)
        print(
            f"{m:5d} {mine * 1e3:10.2f} {flops / mine / 1e9:8.1f} {base * 1e3:12.2f}"
            f" {flops / base / 1e9:8.1f} {base / mine:5.2f}x"
        )


if __name__ == "__main__":
    main()
