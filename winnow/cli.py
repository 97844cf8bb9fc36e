"""Command line: `winnow serve`, `winnow bench serve`, `winnow demo-model`.

`winnow serve` takes `vllm serve`'s flag names where one exists, with vLLM's meaning; a vLLM
flag whose feature Winnow lacks is refused with the reason rather than silently ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from winnow.config import (
    STATS_INTERVAL_S,
    EngineConfig,
    ServerConfig,
    VllmCompatibility,
    rank_layout,
)
from winnow.flags import add_flags, read_flags

logger = logging.getLogger("winnow")

# The configs `winnow serve` reads its flags into (winnow/config.py declares each flag), under
# the titles of their sections in --help.
SERVE_CONFIGS = {
    "engine": EngineConfig,
    "server": ServerConfig,
    "vLLM compatibility": VllmCompatibility,
}
# After a drain has ended every request, how long responses get to reach their clients.
_CLOSE_GRACE_S = 5
# After the engine dies, how long /health answers 503 before the server exits.
_DEATH_GRACE_S = 1.0


def _add_serve_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "serve",
        help="serve a model over the OpenAI API",
        description="Serve a model over the OpenAI API. Every flag also reads WINNOW_<FLAG> "
        "(e.g. WINNOW_MAX_NUM_SEQS); the flag wins.",
    )
    for title, config in SERVE_CONFIGS.items():
        add_flags(parser.add_argument_group(title), config)
    return parser


def serve_configs(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[EngineConfig, ServerConfig]:
    """The configs of parsed `winnow serve` arguments and WINNOW_* variables; what Winnow
    refuses ends the program through `parser.error`."""
    read_flags(parser, args, VllmCompatibility)
    engine = read_flags(parser, args, EngineConfig)
    try:
        rank_layout(engine).check()
    except ValueError as exc:
        parser.error(str(exc))
    return engine, read_flags(parser, args, ServerConfig)


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    p = kinds.add_parser("serve", help="load-test an OpenAI-compatible server (streaming chat)")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the model name to put in requests")
    p.add_argument("--num-prompts", type=int, default=32, help="requests in the run")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    p.add_argument("--input-len", type=int, default=128, help="words per prompt")
    p.add_argument("--output-len", type=int, default=128, help="tokens per answer")
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second (default: all at once)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt generator")
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer key (default: $OPENAI_API_KEY)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--no-extensions",
        dest="extensions",
        action="store_false",
        help="do not send min_tokens/ignore_eos (for servers that reject them)",
    )


def _bench_serve(args: argparse.Namespace) -> None:
    from winnow.benchmark.serve import BenchArgs, format_summary, run_benchmark, summary_dict

    for name in ("httpx", "httpcore"):  # one INFO line per request would break the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
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


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Bind the port at once (503 "loading" until the model is up), serve until SIGTERM drains
    the server; non-zero when the engine died or the model failed to load (so Docker restarts).
    A node other than node 0 (--node-rank) runs its tensor-parallel worker ranks only."""
    if engine_config.node_rank != 0:
        from winnow.distributed.launcher import run_worker_node

        return run_worker_node(engine_config)
    import uvicorn

    from winnow.engine.async_engine import AsyncEngine
    from winnow.engine.stats_log import log_stats_periodically
    from winnow.server.app import build_app
    from winnow.server.connections import ConnectionLimits, bounded_http_protocol
    from winnow.server.lifecycle import DrainingServer

    logger.info("loading %s", engine_config.model)
    engine = AsyncEngine.from_config(engine_config, wait=False)
    app = build_app(engine, server_config)
    uv_config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=server_config.uvicorn_log_level,
        timeout_graceful_shutdown=_CLOSE_GRACE_S,
        timeout_keep_alive=server_config.timeout_keep_alive,
        http=bounded_http_protocol(
            ConnectionLimits(server_config.request_timeout, server_config.max_connections)
        ),
    )
    server = DrainingServer(uv_config, engine, server_config.shutdown_timeout)

    async def run() -> None:
        engine.start()

        async def watch_engine() -> None:
            while not engine.is_dead:
                await asyncio.sleep(0.5)
            if engine.load_error is not None:
                logger.error("the model failed to load", exc_info=engine.load_error)
            else:  # the streams' error events leave, and probes see the 503, before the exit
                await asyncio.sleep(_DEATH_GRACE_S)
            server.should_exit = True

        background = [asyncio.create_task(watch_engine())]
        if server_config.log_stats:
            background.append(
                asyncio.create_task(log_stats_periodically(engine.stats, STATS_INTERVAL_S))
            )
        try:
            await server.serve()
        finally:
            for task in background:
                task.cancel()
            await asyncio.to_thread(engine.shutdown)

    asyncio.run(run())
    return 1 if engine.is_dead else 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `winnow` parser and its `serve` subparser (for checks that report through it)."""
    parser = argparse.ArgumentParser(prog="winnow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = _add_serve_parser(commands)
    _add_bench_parser(commands)
    demo = commands.add_parser("demo-model", help="build the built-in demo model (no network)")
    demo_names = ["demo", "demo-large", "demo-large-bf16"]  # literal: no torch import to parse
    demo.add_argument(
        "name", nargs="?", default="demo", choices=demo_names, help="which demo model"
    )
    return parser, serve_parser


def main(argv: Sequence[str] | None = None) -> None:
    parser, serve_parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        engine_config, server_config = serve_configs(args, serve_parser)
        _configure_logging(server_config.log_level)
        _check_device(engine_config.device)
        sys.exit(serve(engine_config, server_config))
    _configure_logging("info")
    if args.command == "demo-model":
        from winnow.models import build_demo_model

        print(build_demo_model(args.name))
        return
    _bench_serve(args)


def _check_device(device: str) -> None:
    """End the program with one line (no traceback, exit 1) when `--device` cannot be served
    here, before anything loads."""
    from winnow.models.device import DeviceError, resolve_device

    try:
        resolve_device(device)
    except DeviceError as exc:
        sys.exit(f"winnow serve: error: {exc}")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
