"""Chat completions against a real server process, through the official SDK and raw SSE."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM

from tests.e2e.conftest import ServerProcess
from winnow.models import Tokenizer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]


def test_non_streaming_completion(server: ServerProcess) -> None:
    client = server.client()
    response = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12)
    assert response.object == "chat.completion"
    assert response.model == "demo"
    assert response.id.startswith("chatcmpl-")
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage is not None and usage.prompt_tokens > 0
    assert 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_with_usage_chunk(server: ServerProcess) -> None:
    client = server.client()
    stream = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({chunk.id for chunk in chunks}) == 1
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    nonstream = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=10, temperature=0
    )
    greedy_stream = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=10, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in greedy_stream if c.choices)
    assert streamed == nonstream.choices[0].message.content
    assert text  # sampled text is not empty


def read_sse_events(response: httpx.Response) -> list[str]:
    """Split raw SSE bytes into data payloads, asserting the exact framing on the way."""
    raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        if event.startswith(":"):
            continue  # keep-alive comment
        assert event.startswith("data: ") and "\n" not in event, event
        payloads.append(event[len("data: ") :])
    return payloads


def test_raw_sse_framing(server: ServerProcess) -> None:
    body = {
        "model": "demo",
        "messages": MESSAGES,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = read_sse_events(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "demo")
    }


def test_eight_concurrent_streams_complete(server: ServerProcess) -> None:
    def one_stream(i: int) -> tuple[str, str | None]:
        client = server.client()
        stream = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=8 + i,
            stream=True,
            seed=i,
            extra_body={"ignore_eos": True},
        )
        text, finish = "", None
        for chunk in stream:
            delta = chunk.choices[0]
            text += delta.delta.content or ""
            finish = delta.finish_reason or finish
        return text, finish

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one_stream, range(8)))
    assert all(finish == "length" and text for text, finish in results)


def test_greedy_matches_hugging_face_generate(server: ServerProcess, demo_model_dir: Path) -> None:
    max_tokens = 24
    response = server.client().chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=max_tokens, temperature=0
    )
    tokenizer = Tokenizer.from_pretrained(demo_model_dir)
    prompt_ids = tokenizer.render_chat(MESSAGES)
    assert response.usage is not None and response.usage.prompt_tokens == len(prompt_ids)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False
        )[0, len(prompt_ids) :].tolist()
    expected = tokenizer.hf.decode(generated, skip_special_tokens=True)
    assert response.choices[0].message.content == expected
    assert response.usage.completion_tokens == len(generated)


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(server: ServerProcess) -> None:
    client = server.client()
    request = {
        "model": "demo",
        "messages": MESSAGES,
        "max_tokens": 16,
        "temperature": 1.0,
        "seed": 1234,
    }
    alone = client.chat.completions.create(**request).choices[0].message.content  # type: ignore[call-overload]
    again = client.chat.completions.create(**request).choices[0].message.content  # type: ignore[call-overload]
    assert alone == again

    def neighbour(i: int) -> str | None:
        response = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "x" * (i + 1)}],
            max_tokens=40,  # outlasts the seeded request, so they share batches
            temperature=1.0,
            seed=i,
            extra_body={"ignore_eos": True},
        )
        assert response.usage is not None and response.usage.completion_tokens == 40
        return response.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        neighbours = [pool.submit(neighbour, i) for i in range(7)]
        batched = pool.submit(
            lambda: client.chat.completions.create(**request).choices[0].message.content  # type: ignore[call-overload]
        )
        assert batched.result() == alone
        assert all(n.result() for n in neighbours)
