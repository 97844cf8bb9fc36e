"""load_model: a model name/dir -> native module with safetensors weights, config and tokenizer."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from winnow.distributed.group import TensorParallel
from winnow.distributed.partition import check_divisible
from winnow.kernels import Kernels, select_kernels
from winnow.models.config import ModelConfig
from winnow.models.default_model import DEFAULT_MODEL, default_model_dir
from winnow.models.demo import DEMO_MODELS, build_demo_model
from winnow.models.device import resolve_device, startup_line, use_device
from winnow.models.llama import LlamaForCausalLM, TensorSource
from winnow.models.sampling_defaults import read_sampling_defaults
from winnow.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

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
_TOKENIZER_PATTERNS = [p for p in _HUB_PATTERNS if p != "*.safetensors"]


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    dtype: torch.dtype
    device: torch.device
    kernels: Kernels
    sampling_defaults: dict[str, float] = field(default_factory=dict)


def load_model(
    model: str,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    cpu_kernels_enabled: bool = True,
    tokenizer: str | None = None,
    revision: str | None = None,
    download_dir: str | None = None,
    generation_config: str = "auto",
    kernels: str = "auto",
    tp: TensorParallel | None = None,
) -> LoadedModel:
    """Load a local HF directory, the default model's or a demo model's name, or a hub id
    (downloaded if not a local path).

    `tokenizer` (a directory or hub id) replaces the model's own tokenizer files; `revision`
    and `download_dir` apply to a hub download of the model. `generation_config` says where
    sampling defaults come from (see read_sampling_defaults).
    The kernels that run it are chosen here, once (`select_kernels`): an fp32 model on a CPU
    with AVX2 runs on Winnow's C kernels unless `cpu_kernels_enabled` is False (or they cannot
    be built here); `kernels` "torch" or "triton" forces one backend (see `select_kernels`).

    `tp` (size > 1): this rank's slice of the model, each weight read only where it is this
    rank's; the fused C decode stack is off (its layers would skip the all-reduces)."""
    path = resolve_model_path(model, revision=revision, download_dir=download_dir)
    config = ModelConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    torch_device = resolve_device(device)
    use_device(torch_device)
    logger.info("%s", startup_line(torch_device))
    torch_dtype = resolve_dtype(dtype, config, torch_device)
    sharded = tp is not None and tp.size > 1
    if sharded and tp is not None:
        check_divisible(config, tp.size)
    chosen = select_kernels(torch_device, torch_dtype, cpu_kernels_enabled and not sharded, kernels)

    with torch.device("meta"):
        module = LlamaForCausalLM(config, chosen, tp)
    module = module.to(dtype=torch_dtype).to_empty(device=torch_device)
    if sharded:
        for param in module.parameters():
            param.data.zero_()  # the vocab shards' padding rows stay zero
    module.load_weights(_with_progress(iter_safetensors(path), count_tensors(path)))
    module.prepare_kernels()
    module.eval()

    tokenizer_path = (
        path
        if tokenizer is None
        else resolve_model_path(tokenizer, download_dir=download_dir, patterns=_TOKENIZER_PATTERNS)
    )
    loaded_tokenizer = Tokenizer.from_pretrained(
        tokenizer_path,
        chat_template=chat_template,
        trust_remote_code=trust_remote_code,
        model_dir=path,
    )
    defaults = read_sampling_defaults(generation_config, path)
    return LoadedModel(
        module, config, loaded_tokenizer, path, torch_dtype, torch_device, chosen, defaults
    )


def resolve_model_path(
    model: str,
    revision: str | None = None,
    download_dir: str | None = None,
    patterns: list[str] = _HUB_PATTERNS,
) -> Path:
    """The default model's name, a demo name, a local directory, or a hub id downloaded (only
    `patterns` files) into `download_dir` (None: the Hugging Face cache) at `revision` (None:
    the default branch)."""
    if model == DEFAULT_MODEL:
        return default_model_dir()
    if model in DEMO_MODELS:
        return build_demo_model(model)
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if local.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"model {model!r} is neither a model directory nor a hub id")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id=model, revision=revision, cache_dir=download_dir, allow_patterns=patterns
        )
    )


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


def count_tensors(path: Path) -> int:
    """Tensors in the checkpoint (reads only the safetensors headers)."""
    total = 0
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            total += len(f.keys())
    return total


def _with_progress(
    tensors: Iterator[tuple[str, TensorSource]], total: int
) -> Iterator[tuple[str, TensorSource]]:
    """A progress bar on stderr while the weights load, one step per tensor."""
    with tqdm(tensors, total=total, desc="Loading weights", unit="tensor") as bar:
        yield from bar


def iter_safetensors(path: Path) -> Iterator[tuple[str, TensorSource]]:
    """(name, slice) for every tensor of the checkpoint, one at a time: indexing the slice
    reads that part of the file only (`[:]` the whole tensor)."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, f.get_slice(name)
