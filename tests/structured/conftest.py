"""The demo model and an engine factory shared by the constrained-decoding tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from winnow.config import EngineConfig
from winnow.engine.engine import LLMEngine
from winnow.engine.request import GenerationRequest
from winnow.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def loaded(demo_model_dir: Path) -> LoadedModel:
    return load_model(str(demo_model_dir))


def make_engine(loaded: LoadedModel, **overrides: object) -> LLMEngine:
    config = EngineConfig(model="demo", max_num_seqs=64, max_num_batched_tokens=1024)
    return LLMEngine(loaded, replace(config, **overrides))


class Choice:
    """What one choice produced: its text, tokens, logprobs and finish reason."""

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None


def run_all(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[str, dict[int, Choice]]:
    """Run every request to the end; request id -> choice index -> Choice."""
    results: dict[str, dict[int, Choice]] = {r.request_id: {} for r in requests}
    for request in requests:
        engine.add_request(request)
    while engine.has_work:
        for output in engine.step():
            for delta in output.choices:
                choice = results[output.request_id].setdefault(delta.index, Choice())
                choice.text += delta.text
                choice.token_ids += delta.token_ids
                choice.logprobs += [p.sampled.logprob for p in delta.logprobs or ()]
                if delta.finish_reason is not None:
                    choice.finish_reason = delta.finish_reason
    return results
