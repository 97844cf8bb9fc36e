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


async def test_vllm_names_for_routers(client: httpx.AsyncClient) -> None:
    """The gauges and counters vllm-router / smg read, with vLLM's labels; the prefix counters
    count the tokens looked up and found when one long prompt is sent twice."""
    long_chat = [{"role": "user", "content": " ".join(["prefix"] * 80)}]
    body = chat_body(max_tokens=1, messages=long_chat)
    vllm = {"model_name": MODEL, "engine": "0"}
    first = await client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200
    before = (await client.get("/metrics")).text
    second = await client.post("/v1/chat/completions", json=body)
    text = (await client.get("/metrics")).text
    prompt = second.json()["usage"]["prompt_tokens"]
    block = 16  # EngineConfig's default block_size, which the fixture keeps
    assert prompt > 2 * block

    def delta(name: str) -> float:
        return sample(text, name, **vllm) - sample(before, name, **vllm)

    # The last prompt token is always recomputed, so the lookup covers all tokens but it, and
    # the hit is every full block of those.
    assert delta("vllm:prefix_cache_queries_total") == prompt - 1
    assert delta("vllm:prefix_cache_hits_total") == (prompt - 1) // block * block
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert re.search(rf'^vllm:{name}\{{engine="0",model_name="{MODEL}"\}} ', text, re.M)
    usage = sample(text, "vllm:kv_cache_usage_perc", **vllm)
    assert 0.0 <= usage <= 1.0
    assert sample(text, "vllm:gpu_cache_usage_perc", **vllm) == usage
    [info] = re.findall(r"^vllm:cache_config_info\{(.*)\} 1\.0$", text, re.M)
    assert f'block_size="{block}"' in info and 'enable_prefix_caching="True"' in info
    assert re.search(r'num_gpu_blocks="[1-9][0-9]*"', info)
