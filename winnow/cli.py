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
from collections.abc import Callable, Sequence
from typing import Any

from winnow.config import EngineConfig, ServerConfig
from winnow.structured.tool_formats import TOOL_FORMAT_NAMES

logger = logging.getLogger("winnow")

DTYPES = ["auto", "half", "float16", "bfloat16", "float", "float32"]
KV_CACHE_DTYPES = ["auto", "float32", "float16", "bfloat16"]
UVICORN_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]
API_MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs, which the sampler keeps too
STATS_INTERVAL_S = 10.0  # vLLM's interval between stats log lines
# After a drain has ended every request, how long responses get to reach their clients.
_CLOSE_GRACE_S = 5


def env_name(flag: str) -> str:
    """`--max-num-seqs` -> `WINNOW_MAX_NUM_SEQS`."""
    return "WINNOW_" + flag.lstrip("-").upper().replace("-", "_")


def _env(flag: str, default: Any, cast: Callable[[str], Any] = str) -> Any:
    """Default for a flag from its WINNOW_* variable; the flag itself wins."""
    raw = os.environ.get(env_name(flag))
    return default if raw is None else cast(raw)


def _env_list(flag: str) -> list[str]:
    return [item for item in os.environ.get(env_name(flag), "").split(",") if item]


def _env_flag(flag: str, default: bool = False) -> bool:
    raw = os.environ.get(env_name(flag))
    if raw is None:
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _add_serve_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    engine, server = EngineConfig(), ServerConfig()
    p = commands.add_parser(
        "serve",
        help="serve a model over the OpenAI API",
        description="Serve a model over the OpenAI API. Every flag also reads WINNOW_<FLAG> "
        "(e.g. WINNOW_MAX_NUM_SEQS); the flag wins.",
    )
    p.add_argument(
        "model_positional",
        nargs="?",
        metavar="model",
        help="HF model dir, hub id, demo model, or smollm2 (same as --model; default: the built-in "
        "SmolLM2-135M-Instruct)",
    )
    p.add_argument("--model", default=None, help="the model, as the positional argument")
    p.add_argument(
        "--tokenizer",
        default=_env("tokenizer", None),
        help="HF dir or hub id of the tokenizer (default: the model's)",
    )
    p.add_argument(
        "--revision",
        default=_env("revision", None),
        help="hub revision (branch, tag or commit) of a hub model (default: main)",
    )
    p.add_argument(
        "--download-dir",
        default=_env("download_dir", None),
        help="where hub models are downloaded (default: the Hugging Face cache)",
    )
    p.add_argument(
        "--host", default=_env("host", server.host), help="address to listen on (0.0.0.0: all)"
    )
    p.add_argument("--port", type=int, default=_env("port", server.port, int), help="TCP port")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=_env_list("served_model_name"),
        help="name(s) clients put in `model` (default: the model argument)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require this bearer key (repeatable; WINNOW_API_KEY=k1,k2)",
    )
    p.add_argument(
        "--accept-any-model",
        action="store_true",
        default=_env_flag("accept_any_model"),
        help="answer whatever `model` a request names instead of 404",
    )
    p.add_argument(
        "--dtype",
        default=_env("dtype", engine.dtype),
        choices=DTYPES,
        help="weights and activations (auto: fp32 on CPU, the checkpoint's dtype on CUDA; "
        "half = float16, float = float32)",
    )
    p.add_argument(
        "--device", default=_env("device", engine.device), help="cpu, cuda, cuda:N or auto"
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=_env("tensor_parallel_size", 1, int),
        help="devices one replica spans; only 1 (run one server per GPU behind a balancer)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=_env("seed", engine.seed, int),
        help="seeds the seeds drawn for requests that bring none, so a restarted server "
        "answers the same requests the same (default: random)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=_env("max_model_len", None, int),
        help="context length in tokens, prompt plus output (default: the model's)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=_env("max_num_seqs", engine.max_num_seqs, int),
        help="sequences decoded together at most",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=_env("max_queue", engine.max_queue, int),
        help="sequences waiting beyond --max-num-seqs before requests get 429",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=_env("max_num_batched_tokens", engine.max_num_batched_tokens, int),
        help="tokens per engine step (long prompts are prefilled in chunks of this)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=_env("block_size", engine.block_size, int),
        help="tokens per KV-cache block",
    )
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
        help="fraction of GPU memory for weights plus KV cache",
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
        choices=KV_CACHE_DTYPES,
        help="element type of the KV cache (auto: the model's dtype)",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=_env_flag("enable_prefix_caching", engine.enable_prefix_caching),
        help="reuse the KV blocks of a repeated prompt prefix",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        default=_env_flag("enforce_eager"),
        help="never capture CUDA graphs for decode steps",
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
    p.add_argument(
        "--max-n",
        type=int,
        default=_env("max_n", engine.max_n, int),
        help="largest `n` (choices per request) accepted",
    )
    p.add_argument(
        "--max-logprobs",
        type=int,
        default=_env("max_logprobs", engine.max_logprobs, int),
        help=f"largest top_logprobs (completions: logprobs) accepted, 0-{API_MAX_TOP_LOGPROBS}; "
        f"-1: no cap below {API_MAX_TOP_LOGPROBS}",
    )
    p.add_argument(
        "--generation-config",
        default=_env("generation_config", EngineConfig().generation_config),
        help="where the defaults of sampling fields a request omits come from: 'auto' the "
        "model's generation_config.json, 'vllm' OpenAI's defaults, or a folder holding a "
        "generation_config.json",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=_env("max_request_bytes", server.max_request_bytes, int),
        help="largest request body accepted (413 beyond)",
    )
    p.add_argument(
        "--allowed-origins",
        nargs="+",
        default=_env_list("allowed_origins"),
        help="CORS origins allowed to call the API (default: CORS off)",
    )
    p.add_argument(
        "--public-metrics",
        action="store_true",
        default=_env_flag("public_metrics"),
        help="serve /metrics without the API key",
    )
    p.add_argument(
        "--chat-template",
        default=_env("chat_template", None),
        help="path to a Jinja chat template file overriding the model's",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=_env("shutdown_timeout", server.shutdown_timeout, float),
        help="seconds in-flight requests may run on after SIGTERM",
    )
    p.add_argument(
        "--allow-special-tokens-in-content",
        action="store_true",
        default=_env_flag("allow_special_tokens_in_content"),
        help="parse control-token text in chat messages as control tokens (lets users fake "
        "turn boundaries; default: encode it as text)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=_env_flag("trust_remote_code"),
        help="allow a model's own Python code for its config and tokenizer",
    )
    p.add_argument(
        "--log-level",
        default=_env("log_level", "info"),
        help="level of Winnow's own log (debug, info, warning, error)",
    )
    p.add_argument(
        "--uvicorn-log-level",
        default=_env("uvicorn_log_level", "info"),
        choices=UVICORN_LOG_LEVELS,
        help="level of the HTTP server's log, access lines included",
    )
    p.add_argument(
        "--disable-log-stats",
        action="store_true",
        default=_env_flag("disable_log_stats"),
        help=f"no periodic stats line (running, waiting, KV cache use) every "
        f"{STATS_INTERVAL_S:g} s",
    )
    p.add_argument(
        "--disable-log-requests",
        action="store_true",
        default=_env_flag("disable_log_requests"),
        help="accepted for vLLM command lines: Winnow never logs request contents",
    )
    _add_tool_flags(p, server)
    return p


def check_serve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Resolve --model against the positional; refuse, with the reason, what Winnow lacks."""
    if args.model_positional and args.model and args.model_positional != args.model:
        parser.error(
            f"two models given: {args.model_positional!r} and --model {args.model!r}; give one"
        )
    args.model = args.model_positional or args.model or _env("model", EngineConfig().model)
    if args.tensor_parallel_size != 1:
        parser.error(
            f"--tensor-parallel-size {args.tensor_parallel_size}: Winnow runs one model on one "
            "device; only 1 is supported (serve one replica per GPU behind a load balancer)"
        )
    source = args.generation_config
    if source not in ("auto", "vllm") and not os.path.isdir(os.path.expanduser(source)):
        parser.error(f"--generation-config {source}: not 'auto', 'vllm' or a folder")
    if args.max_logprobs == -1:
        args.max_logprobs = API_MAX_TOP_LOGPROBS
    if not 0 <= args.max_logprobs <= API_MAX_TOP_LOGPROBS:
        parser.error(
            f"--max-logprobs {args.max_logprobs}: must be -1 or 0-{API_MAX_TOP_LOGPROBS} "
            f"(the API returns at most {API_MAX_TOP_LOGPROBS} top logprobs)"
        )


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


def _configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """The typed configs of parsed (and checked) `winnow serve` arguments."""
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
        tokenizer=args.tokenizer,
        revision=args.revision,
        download_dir=args.download_dir,
        seed=args.seed,
        max_logprobs=args.max_logprobs,
        enforce_eager=args.enforce_eager,
        generation_config=args.generation_config,
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
        log_stats=not args.disable_log_stats,
        allow_special_tokens_in_content=args.allow_special_tokens_in_content,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
    )
    return engine, server


def serve(engine_config: EngineConfig, server_config: ServerConfig, log_level: str) -> int:
    """Bind the port at once (503 "loading" until the model is up), serve until SIGTERM drains
    the server; non-zero when the engine died or the model failed to load (so Docker restarts)."""
    import uvicorn

    from winnow.engine.async_engine import AsyncEngine
    from winnow.engine.stats_log import log_stats_periodically
    from winnow.server.app import build_app
    from winnow.server.lifecycle import DrainingServer

    logger.info("loading %s", engine_config.model)
    engine = AsyncEngine.from_config(engine_config, wait=False)
    app = build_app(engine, server_config)
    uv_config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=log_level,
        timeout_graceful_shutdown=_CLOSE_GRACE_S,
    )
    server = DrainingServer(uv_config, engine, server_config.shutdown_timeout)

    async def run() -> None:
        engine.start()

        async def watch_engine() -> None:
            while not engine.is_dead:
                await asyncio.sleep(0.5)
            if engine.load_error is not None:
                logger.error("the model failed to load", exc_info=engine.load_error)
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
    check_serve_args(args, serve_parser)
    engine_config, server_config = _configs(args)
    sys.exit(serve(engine_config, server_config, args.uvicorn_log_level))
