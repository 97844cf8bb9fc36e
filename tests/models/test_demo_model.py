"""The built-in demo model: deterministic offline build, HF compatibility, greedy parity."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.models.helpers import PagedRunner
from winnow.kernels.cpu import cpu_kernels
from winnow.models import DEMO_MODELS, Tokenizer, build_demo_model, load_model
from winnow.models.demo import CONTROL_TOKENS, DEMO_SPECS, _write_model_dir, demo_weights


def test_demo_names() -> None:
    assert DEMO_MODELS == ("demo", "demo-large", "demo-large-bf16")
    assert DEMO_SPECS["demo-large-bf16"] == replace(DEMO_SPECS["demo-large"], dtype="bfloat16")


def test_a_bf16_demo_stores_the_fp32_weights_rounded(tmp_path: Path) -> None:
    """A demo spec with dtype bfloat16 saves bf16 tensors and declares them in its config; on
    the CPU it loads as fp32, and where the kernels run its projections keep bf16 panels."""
    spec = replace(DEMO_SPECS["demo"], dtype="bfloat16")
    _write_model_dir(tmp_path, spec)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    stored = load_file(str(tmp_path / "model.safetensors"))
    for name, weight in demo_weights(spec).items():
        assert stored[name].dtype == torch.bfloat16
        assert torch.equal(stored[name], weight.to(torch.bfloat16))
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.dtype == torch.float32
    if cpu_kernels.available():
        assert loaded.model.lm_head.packed.dtype == torch.bfloat16


def test_default_location_honours_cache_env(demo_model_dir: Path, winnow_cache_dir: Path) -> None:
    assert demo_model_dir == winnow_cache_dir / "demo"
    assert build_demo_model() == demo_model_dir


def test_build_is_deterministic_and_skipped_when_complete(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    again = build_demo_model("demo", root=tmp_path)
    assert again == tmp_path / "demo"
    weights = (again / "model.safetensors").read_bytes()
    assert weights == (demo_model_dir / "model.safetensors").read_bytes()
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model("demo", root=tmp_path) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no staging dirs left behind


def test_unknown_demo_name() -> None:
    with pytest.raises(ValueError, match="unknown demo model"):
        build_demo_model("demo-huge")


def test_directory_is_a_standard_hf_checkpoint(demo_model_dir: Path) -> None:
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        128,
        2,
        32768,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(demo_model_dir))
    assert isinstance(hf, transformers.LlamaForCausalLM)
    tok = transformers.AutoTokenizer.from_pretrained(str(demo_model_dir))
    assert len(tok) == 32768
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_parameter_counts() -> None:
    small = DEMO_SPECS["demo"]
    assert small.num_parameters == sum(t.numel() for t in demo_weights(small).values())
    large = DEMO_SPECS["demo-large"]
    assert 150e6 < large.num_parameters < 175e6
    assert not large.tie_word_embeddings and large.max_position_embeddings == 4096


def test_control_tokens_encode_to_single_ids(demo_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(demo_model_dir)
    for i, token in enumerate(CONTROL_TOKENS):
        assert tokenizer.encode(token, add_special_tokens=False) == [3 + i]


def test_greedy_tokens_match_hf_generate(demo_model_dir: Path) -> None:
    loaded = load_model("demo")
    prompt = loaded.tokenizer.render_chat(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours of the rainbow."},
        ]
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(demo_model_dir)).eval()
    expected = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()

    runner = PagedRunner(loaded, num_blocks=16, block_size=16)
    (logits,) = runner.step([("a", prompt)])
    generated = [int(logits[-1].argmax())]
    while len(generated) < 20 and generated[-1] not in loaded.tokenizer.eos_token_ids:
        (logits,) = runner.step([("a", [generated[-1]])])
        generated.append(int(logits[-1].argmax()))
    assert generated == expected
    assert len(set(generated)) > 10  # random weights, but not one token forever
