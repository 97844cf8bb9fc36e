"""--generation-config: a model's generation_config.json as the defaults of omitted fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from winnow.engine.engine import check_sampling_defaults
from winnow.models.sampling_defaults import read_sampling_defaults
from winnow.sampling.params import SamplingParams
from winnow.server.params import sampling_params
from winnow.server.protocol import CompletionRequest

GENERATION_CONFIG = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.9,
    "top_k": 20,
    "max_new_tokens": 512,
}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return tmp_path


def test_auto_reads_the_sampling_keys_of_the_model(model_dir: Path) -> None:
    assert read_sampling_defaults("auto", model_dir) == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
    }


def test_vllm_ignores_the_file(model_dir: Path) -> None:
    assert read_sampling_defaults("vllm", model_dir) == {}


def test_a_folder_replaces_the_model_s_file(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("other")
    (other / "generation_config.json").write_text(json.dumps({"min_p": 0.05}))
    assert read_sampling_defaults(str(other), model_dir) == {"min_p": 0.05}
    with pytest.raises(FileNotFoundError, match="no generation_config.json"):
        read_sampling_defaults(str(tmp_path_factory.mktemp("empty")), model_dir)


def test_auto_without_a_file_has_no_defaults(tmp_path: Path) -> None:
    assert read_sampling_defaults("auto", tmp_path) == {}


def test_defaults_fill_only_what_the_request_omits() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    omitted = CompletionRequest(prompt="x")
    params = sampling_params(
        omitted, max_tokens=4, logprobs=False, top_logprobs=0, defaults=defaults
    )
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, 20)
    given = CompletionRequest(prompt="x", temperature=0.0, top_k=-1)
    params = sampling_params(given, max_tokens=4, logprobs=False, top_logprobs=0, defaults=defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 0.9, -1)
    assert sampling_params(
        omitted, max_tokens=4, logprobs=False, top_logprobs=0, defaults={}
    ) == SamplingParams(max_tokens=4)


def test_defaults_no_request_could_send_refuse_to_start() -> None:
    with pytest.raises(ValueError, match="unusable sampling defaults"):
        check_sampling_defaults({"temperature": 5.0})
    assert check_sampling_defaults({"top_k": 20}) == {"top_k": 20}
