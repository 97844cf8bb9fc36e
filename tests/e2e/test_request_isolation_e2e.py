"""A request whose text fails (a detokeniser that raises, injected by tests/e2e/text_fault into a
real server) ends with its own error; the server keeps serving: the stream beside it completes,
later requests succeed, /health stays 200 and no sequence or KV block stays held."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import ServerProcess, launch, stop_server
from tests.e2e.test_disconnects import engine_gauges

FAULT_HOOK = Path(__file__).parent / "text_fault"
FAULT_MARK = 777  # a prompt holding this token gets the failing detokeniser
TOKENS_BEFORE_FAULT = 3  # tokens that detokeniser turns into text before it raises
MARKED_PROMPT = [1, 1500, FAULT_MARK, 2500]
SETTLE_S = 5.0


@pytest.fixture(scope="module")
def fault_server(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "PYTHONPATH": os.pathsep.join([str(FAULT_HOOK), os.environ.get("PYTHONPATH", "")]),
        "WINNOW_TEST_TEXT_FAULT_MARK": str(FAULT_MARK),
    }
    log_path = tmp_path_factory.mktemp("text-fault") / "server.log"
    server = launch(
        ["serve", str(demo_model_dir), "--served-model-name", "demo"], log_path, env=env
    )
    yield server
    stop_server(server)


def test_a_failing_stream_ends_alone_and_the_server_goes_on(fault_server: ServerProcess) -> None:
    client = fault_server.client()
    # The SDK's `Completion` type has no null finish_reason, which streamed chunks carry: the
    # marked (legacy completions) requests go through a client that does not check it.
    lax = openai.OpenAI(base_url=fault_server.base_url + "/v1", api_key="unused", max_retries=0)
    good = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=200,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    good_chunks = iter(good)
    next(good_chunks)  # the good stream is in flight while the marked one fails
    bad = lax.completions.create(
        model="demo",
        prompt=MARKED_PROMPT,
        max_tokens=100,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    bad_chunks = 0
    with pytest.raises(openai.APIError) as raised:
        for chunk in bad:
            bad_chunks += len(chunk.choices)
    assert raised.value.type == "server_error"
    assert "error while generating" in raised.value.message
    assert bad_chunks <= TOKENS_BEFORE_FAULT
    rest = list(good_chunks)
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 200
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"

    with pytest.raises(openai.InternalServerError) as unary:
        lax.completions.create(model="demo", prompt=MARKED_PROMPT, max_tokens=20)
    assert unary.value.status_code == 500
    assert isinstance(unary.value.body, dict) and unary.value.body["type"] == "server_error"

    later = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=12
    )
    assert later.usage is not None and later.usage.completion_tokens > 0
    assert httpx.get(fault_server.base_url + "/health").status_code == 200
    deadline = time.monotonic() + SETTLE_S
    while (gauges := engine_gauges(httpx.get(fault_server.base_url + "/metrics").text)) != {
        "running": 0.0,
        "waiting": 0.0,
        "kv_usage": 0.0,
    }:
        assert time.monotonic() < deadline, gauges
        time.sleep(0.1)
    log = fault_server.log()
    assert log.count("making the output of request") == 2
    assert "Traceback" in log and "injected detokeniser fault" in log
