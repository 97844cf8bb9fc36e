"""models: token ids + positions + a paged KV-cache view -> logits. Knows nothing about requests."""

from winnow.kernels import AttentionMetadata
from winnow.models.config import ModelConfig
from winnow.models.demo import DEMO_MODELS, build_demo_model
from winnow.models.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
from winnow.models.loader import LoadedModel, load_model, resolve_kv_cache_dtype
from winnow.models.tokenizer import ChatTemplateError, Tokenizer

__all__ = [
    "DEMO_MODELS",
    "AttentionMetadata",
    "ChatTemplateError",
    "LoadedModel",
    "ModelConfig",
    "Tokenizer",
    "allocate_kv_cache",
    "build_demo_model",
    "kv_cache_bytes_per_block",
    "load_model",
    "resolve_kv_cache_dtype",
]
