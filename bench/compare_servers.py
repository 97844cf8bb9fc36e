"""Winnow vs llama.cpp `llama-server` vs `transformers serve --continuous-batching`, one run.

    .venv/bin/python bench/compare_servers.py --llama-server PATH/TO/llama-server \
        --convert-script PATH/TO/convert_hf_to_gguf.py --runs 3

Every server serves the same demo-large weights (llama.cpp from an f32 GGUF converted with
llama.cpp's own script) on loopback; `winnow bench serve`'s load generator sends the same
workload to each. Prints output tok/s at the given concurrency, TTFT and TPOT, single-stream
decode tok/s, ratios, and single-stream speed as a fraction of the memory-bandwidth roofline.
Servers whose binary is not given are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from winnow.benchmark.process import free_port, running_server
from winnow.benchmark.serve import BenchArgs, Summary, run_benchmark
from winnow.models import build_demo_model


@dataclass
class Result:
    name: str
    batch: list[Summary]
    single: list[Summary]

    def median(self, runs: list[Summary], attr: str, key: str | None = None) -> float:
        values = [getattr(s, attr) if key is None else getattr(s, attr)[key] for s in runs]
        return statistics.median(values)


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s for a streaming read of a buffer far larger than the caches (median)."""
    data = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times)


def weight_bytes_per_token(model_dir: Path) -> int:
    """Bytes of weights one decode step reads: everything but the input embedding table (only
    one row of it is read), unless it doubles as the output head."""
    total = 0
    names: set[str] = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                names.add(name)
                tensor = handle.get_slice(name)
                shape = tensor.get_shape()
                numel = 1
                for dim in shape:
                    numel *= dim
                dtype_bytes = {"F32": 4, "BF16": 2, "F16": 2}[tensor.get_dtype()]
                if name == "model.embed_tokens.weight":
                    embed = numel * dtype_bytes
                total += numel * dtype_bytes
    return total - embed if "lm_head.weight" in names else total


def bench(url: str, model: str, args: argparse.Namespace, extensions: bool) -> Result:
    batch, single = [], []
    warm = BenchArgs(
        url, model, num_prompts=2, concurrency=2, input_len=16, output_len=8, extensions=extensions
    )
    asyncio.run(run_benchmark(warm, progress=False))
    for run in range(args.runs):
        # fresh prompts every run, so no run is served from a prefix cache filled by the last
        load = BenchArgs(
            url,
            model,
            num_prompts=args.num_prompts,
            concurrency=args.concurrency,
            input_len=args.input_len,
            output_len=args.output_len,
            seed=1000 + run,
            extensions=extensions,
        )
        batch.append(asyncio.run(run_benchmark(load, progress=False)))
        one = BenchArgs(
            url,
            model,
            num_prompts=2,
            concurrency=1,
            input_len=args.input_len,
            output_len=64,
            seed=2000 + run,
            extensions=extensions,
        )
        single.append(asyncio.run(run_benchmark(one, progress=False)))
        print(
            f"  run: {batch[-1].output_throughput:.1f} tok/s at c={args.concurrency}, "
            f"single {single[-1].output_throughput:.1f} tok/s, errors {batch[-1].errors}",
            flush=True,
        )
    return Result("", batch, single)


def run_server(
    name: str,
    command: list[str],
    url: str,
    model: str,
    args: argparse.Namespace,
    log_dir: Path,
    extensions: bool = True,
) -> Result | None:
    """`extensions`: whether the server accepts min_tokens/ignore_eos (transformers rejects
    unknown fields); the random demo model almost never ends early without them."""
    print(f"{name}: {' '.join(command)}", flush=True)
    try:
        with running_server(command, url, log_dir / f"{name}.log"):
            result = bench(url, model, args, extensions)
    except RuntimeError as exc:
        print(f"{name} failed: {exc}; log in {log_dir / (name + '.log')}")
        return None
    result.name = name
    return result


def convert_to_gguf(model_dir: Path, script: Path, out: Path) -> Path:
    if not out.exists():
        env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
        subprocess.run(
            [
                sys.executable,
                str(script),
                str(model_dir),
                "--outtype",
                "f32",
                "--outfile",
                str(out),
            ],
            check=True,
            env=env,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo-large")
    parser.add_argument("--llama-server", type=Path)
    parser.add_argument("--convert-script", type=Path)
    parser.add_argument(
        "--servers",
        default="llama.cpp,transformers",
        help="peers to run beside winnow (comma-separated: llama.cpp, transformers)",
    )
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    model_dir = build_demo_model(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="winnow-compare-"))
    results: list[Result] = []
    bin_dir = Path(sys.executable).parent

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(bin_dir / "winnow"),
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--served-model-name",
        "bench",
        "--max-num-seqs",
        str(args.concurrency),
        "--log-level",
        "warning",
    ]
    results.append(run_server("winnow", command, url, "bench", args, log_dir))  # type: ignore[arg-type]

    peers = set(args.servers.split(","))
    if "llama.cpp" in peers and args.llama_server and args.convert_script:
        gguf = convert_to_gguf(
            model_dir, args.convert_script, log_dir.parent / "demo-large-f32.gguf"
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        slot_ctx = 2 * (args.input_len + args.output_len) + 64
        command = [
            str(args.llama_server),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(args.concurrency),
            "-c",
            str(args.concurrency * slot_ctx),
            "-t",
            str(args.threads),
            "-b",
            "512",
            "--no-warmup",
        ]
        results.append(run_server("llama.cpp", command, url, "bench", args, log_dir))  # type: ignore[arg-type]

    transformers_cli = bin_dir / "transformers"
    if "transformers" in peers and shutil.which(str(transformers_cli)):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            str(transformers_cli),
            "serve",
            str(model_dir),
            "--device",
            "cpu",
            "--continuous-batching",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        result = run_server("transformers", command, url, str(model_dir), args, log_dir, False)
        results.append(result)  # type: ignore[arg-type]

    done = [r for r in results if r is not None]
    bandwidth = measure_read_bandwidth()
    roofline = bandwidth / weight_bytes_per_token(model_dir)
    print(
        f"\nmedians of {args.runs} runs; {args.num_prompts} prompts, concurrency "
        f"{args.concurrency}, {args.input_len} in / {args.output_len} out; "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s, single-stream roofline {roofline:.1f} tok/s"
    )
    columns = ("out tok/s", 11), ("TTFT p50", 10), ("TPOT p50", 10), ("single", 9), ("roofline", 10)
    print(f"{'server':14}" + "".join(f"{name:>{width}}" for name, width in columns))
    for r in done:
        single = r.median(r.single, "output_throughput")
        print(
            f"{r.name:14}{r.median(r.batch, 'output_throughput'):11.1f}"
            f"{r.median(r.batch, 'ttft_ms', 'p50'):8.0f}ms"
            f"{r.median(r.batch, 'tpot_ms', 'p50'):8.0f}ms"
            f"{single:9.1f}{single / roofline:10.0%}"
        )
    ours = next((r for r in done if r.name == "winnow"), None)
    for other in done:
        if ours is None or other is ours:
            continue
        batch_ratio = ours.median(ours.batch, "output_throughput") / other.median(
            other.batch, "output_throughput"
        )
        single_ratio = ours.median(ours.single, "output_throughput") / other.median(
            other.single, "output_throughput"
        )
        print(
            f"winnow / {other.name}: {batch_ratio:.2f}x output tok/s, "
            f"{single_ratio:.2f}x single stream"
        )
    print(f"logs: {log_dir}")


if __name__ == "__main__":
    main()
