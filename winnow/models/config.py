"""ModelConfig: the architecture facts the native model code needs, read from a HF `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from transformers import AutoConfig, PretrainedConfig

ArchitectureKind = Literal["llama", "mistral", "qwen2", "qwen3"]
SUPPORTED_ARCHITECTURES: tuple[ArchitectureKind, ...] = get_args(ArchitectureKind)
# RoPE types whose inverse frequencies are fixed at load time (no per-step recomputation).
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    architecture: ArchitectureKind
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # the full HF rope parameters when rope_type != "default"
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    sliding_window: int | None = None  # same window on every layer (Mistral v0.1), None = full
    torch_dtype: torch.dtype | None = None  # the checkpoint's dtype as declared in config.json
    hf_config: PretrainedConfig | None = field(default=None, repr=False, compare=False)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else str(self.rope_scaling["rope_type"])

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False) -> ModelConfig:
        """Read `config.json` from a model directory. (The end-of-sequence ids are the
        tokenizer's: `Tokenizer.eos_token_ids`.)"""
        hf = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        return cls.from_hf_config(hf)

    @classmethod
    def from_hf_config(cls, hf: PretrainedConfig) -> ModelConfig:
        kind = getattr(hf, "model_type", None)
        if kind not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model architecture {kind!r} (architectures="
                f"{getattr(hf, 'architectures', None)}); supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' is implemented")

        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        rope_theta, rope_scaling = _rope_parameters(hf)
        attention_bias = bool(getattr(hf, "attention_bias", False))

        return cls(
            architecture=kind,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            intermediate_size=hf.intermediate_size,
            vocab_size=hf.vocab_size,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            # Qwen2 hard-codes a bias on q/k/v (not o); Llama/Qwen3 bias all four when asked.
            qkv_bias=kind == "qwen2" or attention_bias,
            o_bias=kind != "qwen2" and attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=kind == "qwen3",
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            max_position_embeddings=hf.max_position_embeddings,
            bos_token_id=getattr(hf, "bos_token_id", None),
            sliding_window=_sliding_window(hf, kind),
            torch_dtype=_declared_dtype(hf),
            hf_config=hf,
        )


def read_generation_eos(model_dir: Path) -> list[int]:
    """eos ids from `generation_config.json` (a list for e.g. Llama 3 instruct), or []."""
    return _read_eos(model_dir / "generation_config.json")


def read_model_eos(model_dir: Path) -> list[int]:
    """eos ids from `config.json`, or []."""
    return _read_eos(model_dir / "config.json")


def _read_eos(path: Path) -> list[int]:
    if not path.is_file():
        return []
    with path.open() as f:
        return _as_id_list(json.load(f).get("eos_token_id"))


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _rope_parameters(hf: PretrainedConfig) -> tuple[float, dict[str, Any] | None]:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params:  # older transformers: separate rope_theta / rope_scaling attributes
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = float(params.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    return theta, params


def _sliding_window(hf: PretrainedConfig, kind: str) -> int | None:
    window = getattr(hf, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(hf, "layer_types", None)
    if (
        kind in ("qwen2", "qwen3")
        and layer_types
        and any(t != "sliding_attention" for t in layer_types)
    ):
        raise ValueError(
            "per-layer sliding window attention (Qwen use_sliding_window) is unsupported"
        )
    if window >= hf.max_position_embeddings:
        return None
    return int(window)


def _declared_dtype(hf: PretrainedConfig) -> torch.dtype | None:
    # transformers 5 calls it `dtype` (and warns on `torch_dtype`); 4.x only has `torch_dtype`.
    dtype = hf.dtype if hasattr(hf, "dtype") else getattr(hf, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None
