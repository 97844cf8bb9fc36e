"""/metrics: Prometheus text with vLLM's metric names under winnow:, bounded labels."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.server.conftest import MODEL, AppFactory, asgi_client, chat_body

pytestmark = pytest.mark.anyio


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample line of the exposition text (0 when absent)."""
    rendered = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(rendered)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_metrics_count_tokens_and_finish_reasons(client: httpx.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    response = await client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=3, ignore_eos=True, n=2)
    )
    assert response.status_code == 200
    after = await client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    generated = sample(text, "winnow:generation_tokens_total", model_name=MODEL)
    assert generated - sample(before, "winnow:generation_tokens_total", model_name=MODEL) == 6
    prompt = response.json()["usage"]["prompt_tokens"]
    assert (
        sample(text, "winnow:prompt_tokens_total", model_name=MODEL)
        - sample(before, "winnow:prompt_tokens_total", model_name=MODEL)
        == prompt
    )
    length = {"model_name": MODEL, "finished_reason": "length"}
    assert (
        sample(text, "winnow:request_success_total", **length)
        - sample(before, "winnow:request_success_total", **length)
        == 2
    )
    assert sample(text, "winnow:time_to_first_token_seconds_count", model_name=MODEL) >= 1
    assert "winnow:num_requests_running{" in text
    assert "winnow:kv_cache_usage_perc{" in text
    assert "winnow:num_preemptions_total{" in text


async def test_metrics_need_the_key_unless_public(make_app: AppFactory) -> None:
    async with asgi_client(make_app(api_keys=["sekret"])) as http:
        assert (await http.get("/metrics")).status_code == 401
        authorised = await http.get("/metrics", headers={"Authorization": "Bearer sekret"})
        assert authorised.status_code == 200
    async with asgi_client(make_app(api_keys=["sekret"], public_metrics=True)) as http:
        assert (await http.get("/metrics")).status_code == 200
