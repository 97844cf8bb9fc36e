"""Driving an engine to the end in tests."""

from __future__ import annotations

from winnow.engine.engine import LLMEngine
from winnow.engine.request import GenerationRequest


def run_all(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    """Submit `requests`, step until the engine is idle; each request's generated token ids."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for request in requests:
        engine.add_request(request)
    while engine.has_work:
        for output in engine.step():
            for choice in output.choices:
                tokens[output.request_id].extend(choice.token_ids)
    return tokens
