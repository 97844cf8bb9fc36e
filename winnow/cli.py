"""Command line: `winnow serve`, `winnow bench serve`, `winnow demo-model`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from winnow.config import EngineConfig, ServerConfig
from winnow.structured.tool_formats import TOOL_FORMAT_NAMES

logger = logging.getLogger("winnow")


def _env(name: str, default: Any, cast: Callable[[str], Any] = str) -> Any:
    """Default for a flag from WINNOW_<NAME>; the flag itself wins."""
    raw = os.environ.get("WINNOW_" + name.upper().replace("-", "_"))
    return default if raw is None else cast(raw)


def _env_list(name: str) -> list[str]:
    raw = os.environ.get("WINNOW_" + name.upper().replace("-", "_"), "")
    return [item for item in raw.split(",") if item]


def _env_flag(name: str) -> bool:
    raw = os.environ.get("WINNOW_" + name.upper().replace("-", "_"), "")
    return raw.lower() in ("1", "true", "yes", "on")


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    engine, server = EngineConfig(), ServerConfig()
    p = commands.add_parser("serve", help="serve a model over the OpenAI API")
    p.add_argument(
        "model",
        nargs="?",
        default=_env("model", engine.model),
        help="HF model dir or hub id; default: the built-in demo model",
    )
    p.add_argument("--host", default=_env("host", server.host))
    p.add_argument("--port", type=int, default=_env("port", server.port, int))
    p.add_argument("--served-model-name", nargs="+", default=_env_list("served_model_name"))
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require this bearer key (repeatable; WINNOW_API_KEY=k1,k2)",
    )
    p.add_argument("--accept-any-model", action="store_true", default=_env_flag("accept_any_model"))
    p.add_argument(
        "--dtype",
        default=_env("dtype", engine.dtype),
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    p.add_argument("--device", default=_env("device", engine.device))
    p.add_argument("--max-model-len", type=int, default=_env("max_model_len", None, int))
    p.add_argument(
        "--max-num-seqs", type=int, default=_env("max_num_seqs", engine.max_num_seqs, int)
    )
    p.add_argument("--max-queue", type=int, default=_env("max_queue", engine.max_queue, int))
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=_env("max_num_batched_tokens", engine.max_num_batched_tokens, int),
    )
    p.add_argument("--block-size", type=int, default=_env("block_size", engine.block_size, int))
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        default=_env("kv_cache_memory", engine.kv_cache_memory_gib, float),
        help="GiB of KV cache on CPU",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=_env("gpu_memory_utilization", engine.gpu_memory_utilization, float),
    )
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=_env("num_kv_blocks", None, int),
        help="KV pool size in blocks, overriding the memory budget",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default=_env("kv_cache_dtype", engine.kv_cache_dtype),
        choices=["auto", "float32", "float16", "bfloat16"],
        help="element type of the KV cache (auto: the model's dtype)",
    )
    p.add_argument(
        "--no-enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        default=not _env_flag("no_enable_prefix_caching"),
    )
    p.add_argument(
        "--no-cpu-kernels",
        dest="cpu_kernels",
        action="store_false",
        default=not _env_flag("no_cpu_kernels"),
        help="fp32 on CPU: use PyTorch's matmul and attention instead of Winnow's AVX2 kernels",
    )
    p.add_argument(
        "--num-threads",
        type=int,
        default=_env("num_threads", engine.num_threads, int),
        help="torch CPU threads for the engine (0: one per core)",
    )
    p.add_argument("--max-n", type=int, default=_env("max_n", engine.max_n, int))
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=_env("max_request_bytes", server.max_request_bytes, int),
    )
    p.add_argument("--allowed-origins", nargs="+", default=_env_list("allowed_origins"))
    p.add_argument("--public-metrics", action="store_true", default=_env_flag("public_metrics"))
    p.add_argument(
        "--chat-template",
        default=_env("chat_template", None),
        help="path to a Jinja chat template file overriding the model's",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=_env("shutdown_timeout", server.shutdown_timeout, float),
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", default=_env_flag("trust_remote_code")
    )
    _add_tool_flags(p, server)
    p.add_argument("--log-level", default=_env("log_level", "info"))


def _add_tool_flags(p: argparse.ArgumentParser, server: ServerConfig) -> None:
    """vLLM's tool flags; auto tool choice is on unless --no-enable-auto-tool-choice."""
    p.add_argument(
        "--tool-call-parser",
        choices=TOOL_FORMAT_NAMES,
        default=_env("tool_call_parser", server.tool_call_parser),
        help="tool-call format (default: detected from the chat template)",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=_env(
            "enable_auto_tool_choice",
            server.enable_auto_tool_choice,
            lambda raw: raw.lower() in ("1", "true", "yes", "on"),
        ),
        help='parse tool calls for tool_choice "auto"',
    )


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    p = kinds.add_parser("serve", help="load-test an OpenAI-compatible server (streaming chat)")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson req/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--no-extensions",
        dest="extensions",
        action="store_false",
        help="do not send min_tokens/ignore_eos (for servers that reject them)",
    )


def _bench_serve(args: argparse.Namespace) -> None:
    from winnow.benchmark.serve import BenchArgs, format_summary, run_benchmark, summary_dict

    bench_args = BenchArgs(
        base_url=args.base_url.rstrip("/").removesuffix("/v1"),
        model=args.model,
        num_prompts=args.num_prompts,
        concurrency=args.concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        request_rate=args.request_rate,
        seed=args.seed,
        api_key=args.api_key,
        extensions=args.extensions,
    )
    summary = asyncio.run(run_benchmark(bench_args, progress=not args.json))
    if args.json:
        import json

        print(json.dumps(summary_dict(summary)))
    else:
        print(format_summary(summary))


def _configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    engine = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory_gib=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_dtype=args.kv_cache_dtype,
        num_threads=args.num_threads,
        enable_prefix_caching=args.enable_prefix_caching,
        cpu_kernels=args.cpu_kernels,
        max_n=args.max_n,
        chat_template=args.chat_template,
        trust_remote_code=args.trust_remote_code,
    )
    server = ServerConfig(
        host=args.host,
        port=args.port,
        served_model_names=args.served_model_name,
        api_keys=args.api_key or _env_list("api_key"),
        accept_any_model=args.accept_any_model,
        max_request_bytes=args.max_request_bytes,
        allowed_origins=args.allowed_origins,
        public_metrics=args.public_metrics,
        shutdown_timeout=args.shutdown_timeout,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
    )
    return engine, server


def serve(engine_config: EngineConfig, server_config: ServerConfig, log_level: str) -> int:
    """Load the model, serve until stopped; non-zero when the engine died (so Docker restarts)."""
    import uvicorn

    from winnow.engine.async_engine import AsyncEngine
    from winnow.server.app import build_app

    logger.info("loading %s", engine_config.model)
    engine = AsyncEngine.from_config(engine_config)
    app = build_app(engine, server_config)
    uv_config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=log_level,
        timeout_graceful_shutdown=int(server_config.shutdown_timeout),
    )
    server = uvicorn.Server(uv_config)

    async def run() -> None:
        engine.start()

        async def watch_engine() -> None:
            while not engine.is_dead:
                await asyncio.sleep(0.5)
            server.should_exit = True

        watcher = asyncio.create_task(watch_engine())
        try:
            await server.serve()
        finally:
            watcher.cancel()
            await asyncio.to_thread(engine.shutdown)

    asyncio.run(run())
    return 1 if engine.is_dead else 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="winnow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(commands)
    _add_bench_parser(commands)
    demo = commands.add_parser("demo-model", help="build the built-in demo model (no network)")
    demo_names = ["demo", "demo-large", "demo-large-bf16"]  # literal: no torch import to parse
    demo.add_argument("name", nargs="?", default="demo", choices=demo_names)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "demo-model":
        from winnow.models import build_demo_model

        print(build_demo_model(args.name))
        return
    if args.command == "bench":
        _bench_serve(args)
        return
    engine_config, server_config = _configs(args)
    sys.exit(serve(engine_config, server_config, args.log_level))
