"""Where load_model takes the model and tokenizer from: --tokenizer, --revision, --download-dir."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest

from tests.models.helpers import make_hf_model, save_hf_model
from winnow.models import load_model
from winnow.models.loader import resolve_model_path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(make_hf_model("llama", seed=5), tmp_path_factory.mktemp("llama"))


def test_tokenizer_from_another_directory(llama_dir: Path, demo_model_dir: Path) -> None:
    own = load_model(str(llama_dir)).tokenizer
    loaded = load_model(str(llama_dir), tokenizer=str(demo_model_dir))
    assert loaded.tokenizer.vocab_size == len(loaded.tokenizer.hf) != own.vocab_size
    model_eos = json.loads((llama_dir / "config.json").read_text())["eos_token_id"]
    assert model_eos in loaded.tokenizer.eos_token_ids  # the model still decides where it stops


def test_hub_download_takes_revision_and_download_dir(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, object]] = []

    def fake_snapshot_download(**kwargs: object) -> str:
        calls.append(kwargs)
        return str(llama_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = resolve_model_path("org/model", revision="v2", download_dir="/tmp/models")
    assert path == llama_dir
    (call,) = calls
    assert (call["revision"], call["cache_dir"]) == ("v2", "/tmp/models")


def test_a_hub_tokenizer_downloads_no_weights(
    llama_dir: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, object]] = []

    def fake_snapshot_download(**kwargs: object) -> str:
        calls.append(kwargs)
        return str(demo_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    load_model(str(llama_dir), tokenizer="org/tokenizer", download_dir="/tmp/models")
    (call,) = calls
    assert call["repo_id"] == "org/tokenizer" and call["cache_dir"] == "/tmp/models"
    patterns = call["allow_patterns"]
    assert isinstance(patterns, list) and "*.json" in patterns
    assert not any(p.endswith(".safetensors") for p in patterns)
