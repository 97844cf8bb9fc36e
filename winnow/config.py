"""Typed configuration for the server and the engine (filled from CLI flags and WINNOW_* vars)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    """How the engine loads the model and spends time and memory.

    `model` is a local Hugging Face directory, a hub id, or a demo name ("demo", "demo-large",
    "demo-large-bf16").
    `max_model_len` None means the model's own context length. `num_kv_blocks` overrides the
    KV pool size derived from the memory budget (tests and capacity planning). `num_threads`
    sets torch's CPU threads (0: torch's default, one per core); the CPU kernels use as many.
    `cpu_kernels` False keeps an fp32 CPU model on PyTorch's matmul and attention.
    `chat_template` is a path to a Jinja file that replaces the model's template.
    `kv_cache_dtype` "auto" stores keys/values in the model's dtype; "float16" / "bfloat16"
    halve an fp32 model's cache (twice the tokens in the same memory, half the bytes each decode
    reads) at the cost of rounding every cached key and value.
    """

    model: str = "demo"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_queue: int = 256
    max_num_batched_tokens: int = 512
    block_size: int = 16
    kv_cache_memory_gib: float = 1.0
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    kv_cache_dtype: str = "auto"
    num_threads: int = 0
    enable_prefix_caching: bool = True
    cpu_kernels: bool = True
    max_n: int = 16
    chat_template: str | None = None
    trust_remote_code: bool = False


@dataclass
class ServerConfig:
    """`tool_call_parser` names the tool-call format ("hermes", "llama3_json", "mistral");
    None detects it from the chat template. `enable_auto_tool_choice` False answers
    tool_choice "auto" with a 400, as vLLM does without its flag."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: list[str] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)
    accept_any_model: bool = False
    max_request_bytes: int = 4 * 1024 * 1024
    allowed_origins: list[str] = field(default_factory=list)
    public_metrics: bool = False
    shutdown_timeout: float = 30.0
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = True
