"""load_model: a model name/dir -> native module with safetensors weights, config and tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from winnow.kernels import Kernels, select_kernels
from winnow.models.config import ModelConfig
from winnow.models.demo import DEMO_MODELS, build_demo_model
from winnow.models.llama import LlamaForCausalLM
from winnow.models.tokenizer import Tokenizer

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a hub download fetches: configs, safetensors weights, tokenizer files; never pickles.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    dtype: torch.dtype
    device: torch.device
    kernels: Kernels


def load_model(
    model: str,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    cpu_kernels_enabled: bool = True,
) -> LoadedModel:
    """Load a local HF directory, a demo name, or a hub id (downloaded if not a local path).

    The kernels that run it are chosen here, once (`select_kernels`): an fp32 model on a CPU
    with AVX2 runs on Winnow's C kernels unless `cpu_kernels_enabled` is False (or they cannot
    be built here)."""
    path = resolve_model_path(model)
    config = ModelConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config, torch_device)
    kernels = select_kernels(torch_device, torch_dtype, cpu_kernels_enabled)

    with torch.device("meta"):
        module = LlamaForCausalLM(config, kernels)
    module = module.to(dtype=torch_dtype).to_empty(device=torch_device)
    module.load_weights(iter_safetensors(path))
    module.prepare_kernels()
    module.eval()

    tokenizer = Tokenizer.from_pretrained(
        path, chat_template=chat_template, trust_remote_code=trust_remote_code
    )
    return LoadedModel(module, config, tokenizer, path, torch_dtype, torch_device, kernels)


def resolve_model_path(model: str) -> Path:
    if model in DEMO_MODELS:
        return build_demo_model(model)
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if local.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"model {model!r} is neither a model directory nor a hub id")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=model, allow_patterns=_HUB_PATTERNS))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """ "auto": on CUDA the checkpoint's dtype when it is 16-bit, else bfloat16 (the GPU's
    tensor cores run 16-bit; an fp32 checkpoint would double the bytes every step reads);
    float32 on a CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            declared = config.torch_dtype
            return declared if declared in (torch.float16, torch.bfloat16) else torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype: "auto" keeps the model's dtype, else a dtype named as for --dtype."""
    if name == "auto":
        return model_dtype
    if name not in _DTYPES:
        raise ValueError(f"unsupported kv cache dtype {name!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded via the index, or single); refuses pickles."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(
            f"{path} has only pickle weights ({', '.join(sorted(pickles))}); winnow loads "
            "safetensors only (pickles can run arbitrary code). Convert the checkpoint first."
        )
    raise FileNotFoundError(f"no *.safetensors weights in {path} (winnow loads safetensors only)")


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, memory-mapped one at a time."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, f.get_tensor(name)
