"""Random-weight models of real shapes, built in memory on the device (no hub, no weight files).

One set of weights serves both sides of a comparison: the Hugging Face model is built first and
Winnow's native model loads its state dict.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from winnow.kernels import select_kernels
from winnow.models import LoadedModel, ModelConfig, Tokenizer
from winnow.models.llama import LlamaForCausalLM

# name -> (config class, kwargs): the published shapes; weights are random
SHAPES: dict[str, tuple[type[transformers.PretrainedConfig], dict[str, object]]] = {
    "qwen2.5-0.5b": (
        transformers.Qwen2Config,
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
        ),
    ),
    "llama-3.1-8b": (
        transformers.LlamaConfig,
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
        ),
    ),
    # the dry run's stand-in: same code paths, tiny
    "tiny": (
        transformers.LlamaConfig,
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
    ),
}


@dataclass
class Pair:
    hf: transformers.PreTrainedModel
    loaded: LoadedModel


def hf_config(shape: str) -> transformers.PretrainedConfig:
    config_cls, kwargs = SHAPES[shape]
    return config_cls(**kwargs)


def parameter_count(shape: str) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(shape))
    return sum(p.numel() for p in model.parameters())


def build_hf(shape: str, device: str, dtype: torch.dtype, seed: int = 0):  # noqa: ANN201
    """HF model with every weight drawn at random (norms near 1): peaked, varied logits, so that
    greedy comparisons rarely meet near-ties."""
    config = hf_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param.dim() > 1:
                param.normal_(0.0, 1.5 / param.shape[-1] ** 0.5)
            else:
                param.normal_(0.0, 0.05)
    return model.eval()


def native_from(hf: transformers.PreTrainedModel, device: str, dtype: torch.dtype) -> LoadedModel:
    """Winnow's model on `device` in `dtype`, with the kernels it would choose there, holding the
    HF model's weights; a word-level tokenizer of the full vocabulary."""
    config = ModelConfig.from_hf_config(hf.config)
    torch_device = torch.device(device)
    kernels = select_kernels(torch_device, dtype)
    with torch.device("meta"):
        module = LlamaForCausalLM(config, kernels)
    module = module.to(dtype=dtype).to_empty(device=torch_device)
    module.load_weights((name, t.to(dtype)) for name, t in hf.state_dict().items())
    module.prepare_kernels()
    module.eval()
    path = Path(tempfile.mkdtemp(prefix="winnow-gpu-tokenizer-"))
    word_tokenizer(config.vocab_size).save_pretrained(str(path))
    tokenizer = Tokenizer.from_pretrained(path)
    return LoadedModel(module, config, tokenizer, path, dtype, torch_device, kernels)


def word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """One word per id, in sentencepiece style ("▁" marks a leading space) so that the engine
    can tell how its pieces map to bytes."""
    words = ["<unk>", "<s>", "</s>"] + [f"▁w{i}" for i in range(3, vocab_size)]
    backend = BackendTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def random_prompts(count: int, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths[:count]]
