"""Winnow vs llama.cpp `llama-server` vs `transformers serve --continuous-batching`, one run.

    .venv/bin/python bench/compare_servers.py --llama-server PATH/TO/llama-server \
        --convert-script PATH/TO/convert_hf_to_gguf.py --runs 3

Every server serves the same demo weights (`--model demo-large`, or `demo-large-bf16` for the
same weights stored as bf16; llama.cpp from a GGUF of the checkpoint's dtype converted with
llama.cpp's own script) on loopback; `winnow bench serve`'s load generator sends the same
workload to each. All servers stay up and the runs alternate between them, so a drifting machine
affects each alike. Prints output tok/s at the given concurrency, TTFT and TPOT, single-stream
tok/s and decode tok/s, ratios, and single-stream decode as a fraction of the memory-bandwidth
roofline. Servers whose binary is not given are skipped.

`--baseline-source DIR` adds a second Winnow, run from another checkout (`git worktree add DIR
REV`), to compare two revisions of Winnow on the same machine in the same run:

    .venv/bin/python bench/compare_servers.py --servers none --baseline-source ../old --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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
from winnow.kernels.cpu import cpu_kernels
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
    """Bytes/s of the fastest streaming read of a buffer far larger than the caches (median of
    each method, then the larger): torch's sum, and where the kernels are built, the batch-1
    projection kernel (its software prefetch reads faster than the sum, so the sum alone would
    put a roofline below what a server can reach)."""
    data = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    readers = [data.sum]
    if cpu_kernels.available():
        k = 4096
        packed = data.view(-1, k, cpu_kernels.PANEL)
        x = torch.ones(1, k)
        readers.append(
            lambda: cpu_kernels.linear(x, packed, packed.shape[0] * cpu_kernels.PANEL, None)
        )
    rates = []
    for read in readers:
        read()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            read()
            times.append(time.perf_counter() - start)
        rates.append(data.numel() * 4 / statistics.median(times))
    return max(rates)


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


@dataclass
class Server:
    name: str
    command: list[str]
    url: str
    model: str
    extensions: bool = True  # accepts min_tokens/ignore_eos (transformers rejects unknown fields)


def one_round(server: Server, args: argparse.Namespace, run: int) -> tuple[Summary, Summary]:
    """The concurrent load, then a single stream; fresh prompts every run, so that no run is
    served from a prefix cache filled by the one before."""

    def workload(num_prompts: int, concurrency: int, output_len: int, seed: int) -> BenchArgs:
        return BenchArgs(
            server.url, server.model, num_prompts=num_prompts, concurrency=concurrency,
            input_len=args.input_len, output_len=output_len, seed=seed,
            extensions=server.extensions,
        )  # fmt: skip

    load = workload(args.num_prompts, args.concurrency, args.output_len, seed=1000 + run)
    batch = asyncio.run(run_benchmark(load, progress=False))
    one = workload(2, 1, 64, seed=2000 + run)
    single = asyncio.run(run_benchmark(one, progress=False))
    error = f" ({batch.first_error[:120]})" if batch.errors else ""
    print(
        f"  {server.name} run {run + 1}: {batch.output_throughput:.1f} tok/s at "
        f"c={args.concurrency}, single {single.output_throughput:.1f} tok/s "
        f"(decode {1000 / single.tpot_ms['p50']:.1f}), errors {batch.errors}{error}",
        flush=True,
    )
    return batch, single


def bench_all(
    servers: list[Server], args: argparse.Namespace, log_dir: Path
) -> tuple[list[Result], list[float]]:
    """All servers up at once (idle ones sleep), runs interleaved server by server, so that every
    server meets the same machine: on a shared host the speed drifts by tens of percent.
    Returns the results and the read bandwidth measured after each round."""
    results = {s.name: Result(s.name, [], []) for s in servers}
    bandwidths = []
    with contextlib.ExitStack() as stack:
        for server in servers:
            print(f"{server.name}: {' '.join(server.command)}", flush=True)
            stack.enter_context(
                running_server(server.command, server.url, log_dir / f"{server.name}.log")
            )
            warm = BenchArgs(
                server.url, server.model, num_prompts=2, concurrency=2, input_len=16,
                output_len=8, extensions=server.extensions,
            )  # fmt: skip
            asyncio.run(run_benchmark(warm, progress=False))
        for run in range(args.runs):
            for server in servers:
                batch, single = one_round(server, args, run)
                results[server.name].batch.append(batch)
                results[server.name].single.append(single)
            bandwidths.append(measure_read_bandwidth())
    return [results[s.name] for s in servers], bandwidths


def convert_to_gguf(model_dir: Path, script: Path, outtype: str, out: Path) -> Path:
    if not out.exists():
        env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
        subprocess.run(
            [
                sys.executable,
                str(script),
                str(model_dir),
                "--outtype",
                outtype,
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
    parser.add_argument(
        "--baseline-source",
        type=Path,
        help="a checkout of another Winnow revision, served beside this one as 'winnow@base'",
    )
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="Winnow's --kv-cache-dtype (float16: the KV precision llama-server uses by default)",
    )
    args = parser.parse_args()

    model_dir = build_demo_model(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="winnow-compare-"))
    bin_dir = Path(sys.executable).parent
    servers = []

    def winnow_server(name: str, launcher: list[str]) -> Server:
        url = f"http://127.0.0.1:{free_port()}"
        command = [*launcher, "serve", str(model_dir), "--port", url.rsplit(":", 1)[1]]
        command += ["--served-model-name", "bench", "--max-num-seqs", str(args.concurrency)]
        command += ["--kv-cache-dtype", args.kv_cache_dtype, "--log-level", "warning"]
        return Server(name, command, url, "bench")

    servers.append(winnow_server("winnow", [str(bin_dir / "winnow")]))
    if args.baseline_source:
        source = f"PYTHONPATH={args.baseline_source.resolve()}"
        launcher = ["env", source, sys.executable, "-m", "winnow"]
        servers.append(winnow_server("winnow@base", launcher))

    peers = set(args.servers.split(","))
    if "llama.cpp" in peers and args.llama_server and args.convert_script:
        dtype = json.loads((model_dir / "config.json").read_text())["torch_dtype"]
        outtype = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[dtype]
        gguf = convert_to_gguf(
            model_dir, args.convert_script, outtype, log_dir.parent / f"{args.model}-{outtype}.gguf"
        )
        url = f"http://127.0.0.1:{free_port()}"
        slot_ctx = 2 * (args.input_len + args.output_len) + 64
        command = [str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1"]
        command += ["--port", url.rsplit(":", 1)[1], "-np", str(args.concurrency)]
        command += ["-c", str(args.concurrency * slot_ctx), "-t", str(args.threads)]
        servers.append(Server("llama.cpp", [*command, "-b", "512", "--no-warmup"], url, "bench"))

    transformers_cli = bin_dir / "transformers"
    if "transformers" in peers and shutil.which(str(transformers_cli)):
        url = f"http://127.0.0.1:{free_port()}"
        command = [str(transformers_cli), "serve", str(model_dir), "--device", "cpu"]
        command += ["--continuous-batching", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
        servers.append(Server("transformers", command, url, str(model_dir), extensions=False))

    done, bandwidths = bench_all(servers, args, log_dir)
    bandwidth = statistics.median(bandwidths)
    roofline = bandwidth / weight_bytes_per_token(model_dir)
    print(
        f"\nmedians of {args.runs} interleaved runs; {args.num_prompts} prompts, concurrency "
        f"{args.concurrency}, {args.input_len} in / {args.output_len} out; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s, single-stream decode roofline {roofline:.1f} tok/s"
    )
    columns = [("out tok/s", 11), ("TTFT p50", 10), ("TPOT p50", 10), ("single", 9)]
    columns += [("decode", 9), ("roofline", 10)]
    print(f"{'server':14}" + "".join(f"{name:>{width}}" for name, width in columns))
    for r in done:
        decode = 1000 / r.median(r.single, "tpot_ms", "p50")
        print(
            f"{r.name:14}{r.median(r.batch, 'output_throughput'):11.1f}"
            f"{r.median(r.batch, 'ttft_ms', 'p50'):8.0f}ms"
            f"{r.median(r.batch, 'tpot_ms', 'p50'):8.0f}ms"
            f"{r.median(r.single, 'output_throughput'):9.1f}{decode:9.1f}{decode / roofline:10.0%}"
        )
    print("single: output tok/s of one stream (TTFT included); decode: 1000 / its TPOT p50")
    ours = done[0]
    for other in done[1:]:
        ratios = [
            ours.median(ours.batch, "output_throughput")
            / other.median(other.batch, "output_throughput"),
            ours.median(ours.single, "output_throughput")
            / other.median(other.single, "output_throughput"),
            other.median(other.single, "tpot_ms", "p50")
            / ours.median(ours.single, "tpot_ms", "p50"),
        ]
        print(
            f"winnow / {other.name}: {ratios[0]:.2f}x output tok/s, {ratios[1]:.2f}x single "
            f"stream, {ratios[2]:.2f}x single-stream decode"
        )
    print(f"logs: {log_dir}")


if __name__ == "__main__":
    main()
