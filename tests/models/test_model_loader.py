"""load_model: checkpoint discovery, sharding, refusal of pickles, dtype/device resolution."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.models.helpers import PagedRunner, hf_logits, make_hf_model, save_hf_model
from tests.tolerances import assert_within, logit_tolerance
from winnow.models import LoadedModel, ModelConfig, load_model, resolve_kv_cache_dtype
from winnow.models.loader import resolve_dtype, resolve_model_path, safetensors_files


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(make_hf_model("llama", seed=5), tmp_path_factory.mktemp("llama"))


def test_loads_local_dir_on_cpu_float32_eval(llama_dir: Path) -> None:
    loaded = load_model(str(llama_dir))
    assert isinstance(loaded, LoadedModel)
    assert loaded.path == llama_dir
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert loaded.config.architecture == "llama"
    assert loaded.tokenizer.vocab_size == loaded.config.vocab_size


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    hf = make_hf_model("qwen2", seed=6)
    save_hf_model(hf, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(safetensors_files(tmp_path)) > 2
    tokens = [5, 17, 3, 88, 42, 9]
    (logits,) = PagedRunner(load_model(str(tmp_path))).step([("a", tokens)])
    assert_within(logits, hf_logits(hf, tokens), logit_tolerance(hf))


def test_tied_checkpoint_that_also_stores_lm_head_loads(tmp_path: Path) -> None:
    hf = make_hf_model("llama-tied", seed=7)
    save_hf_model(hf, tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_model(str(tmp_path), cpu_kernels_enabled=False)
    assert loaded.model.lm_head is None
    tokens = [1, 2, 3, 4]
    (logits,) = PagedRunner(loaded).step([("a", tokens)])
    assert_within(logits, hf_logits(hf, tokens), logit_tolerance(hf))


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    hf = make_hf_model("llama", seed=8)
    hf.config.save_pretrained(str(tmp_path))
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        load_model(str(tmp_path))


def test_missing_weight_is_reported(llama_dir: Path, tmp_path: Path) -> None:
    for item in llama_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(str(tmp_path))


def test_wrong_shape_is_reported(llama_dir: Path, tmp_path: Path) -> None:
    for item in llama_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["model.norm.weight"] = torch.ones(3)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_model(str(tmp_path))


def test_no_weights_at_all(tmp_path: Path) -> None:
    transformers.LlamaConfig(hidden_size=64, num_attention_heads=4).save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path: Path) -> None:
    transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported model architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_missing_local_path_is_not_a_hub_id() -> None:
    with pytest.raises(FileNotFoundError):
        resolve_model_path("./no/such/model")


def test_hub_id_downloads_only_safe_files(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []

    def fake_snapshot_download(**kwargs: object) -> str:
        calls.append(kwargs)
        return str(llama_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_path("some-org/some-model") == llama_dir
    (call,) = calls
    assert call["repo_id"] == "some-org/some-model"
    patterns = call["allow_patterns"]
    assert isinstance(patterns, list) and "*.safetensors" in patterns
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in patterns)


def test_resolve_dtype(llama_dir: Path) -> None:
    config = load_model(str(llama_dir)).config
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", config, cpu) == torch.float32
    assert config.torch_dtype in (None, torch.float32)
    assert resolve_dtype("auto", config, cuda) == torch.bfloat16  # fp32 checkpoints run in bf16
    assert resolve_dtype("bfloat16", config, cpu) == torch.bfloat16
    assert resolve_dtype("half", config, cpu) == torch.float16
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype("int8", config, cpu)


def test_auto_dtype_on_cuda_follows_config(tmp_path: Path) -> None:
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, dtype="bfloat16")
    cfg.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text()).get("dtype") == "bfloat16"
    config = ModelConfig.from_pretrained(tmp_path)
    assert resolve_dtype("auto", config, torch.device("cuda")) == torch.bfloat16
    cfg.dtype = "float16"
    cfg.save_pretrained(str(tmp_path))
    config = ModelConfig.from_pretrained(tmp_path)
    assert resolve_dtype("auto", config, torch.device("cuda")) == torch.float16


def test_kv_cache_dtype_names() -> None:
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("float16", torch.float32) == torch.float16
    assert resolve_kv_cache_dtype("bf16", torch.float32) == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported kv cache dtype 'int8'"):
        resolve_kv_cache_dtype("int8", torch.float32)
