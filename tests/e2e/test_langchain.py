"""LangChain's standard integration suite for chat models (`langchain-tests`), run with
`ChatOpenAI` against a live Winnow server on the default model, SmolLM2-135M-Instruct.

A trained model, because the suite checks answers as well as the wire format: `magic_function(3)`
called with 3, a Chinese name copied into a tool call's arguments, a structured-output joke that
ends. Greedy, with a frequency penalty: greedy alone, a model this small repeats itself (a joke
string or a tool call over and over until max_tokens). The suite's own switches skip what Winnow
does not serve (images, audio, PDF, Anthropic-style inputs, VCR cassettes, a second model name);
`BEYOND_THE_MODEL` lists the two tests whose answers a 135M model cannot give.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

from tests.e2e.conftest import ServerProcess
from winnow.models.default_model import DEFAULT_MODEL

pytestmark = pytest.mark.anyio  # the suite's async tests run on anyio's plugin, like ours

# What each asserts of the model, and where Winnow's own part of it is tested instead.
BEYOND_THE_MODEL = {
    "test_agent_loop": "that it calls a tool unprompted (tool_choice auto): SmolLM2-135M answers "
    "in prose even given its family's own tool prompt; the tool round trip runs in "
    "test_tool_message_histories_* and tests/e2e/test_tools_e2e.py",
    "test_json_mode": "that JSON mode's object has the keys the prompt asks for: SmolLM2-135M "
    "writes a valid object with other keys; valid objects are tested in "
    "tests/structured/test_response_format_e2e.py",
}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
async def one_event_loop(anyio_backend: str) -> AsyncIterator[None]:
    """Keeps anyio's event loop open for the whole module (it lives while an async fixture or
    test holds it): langchain-openai caches its async HTTP client across models, so a loop per
    test would leave the next test a client bound to a closed loop."""
    yield


@pytest.fixture(autouse=True)
def winnow_endpoint(
    request: pytest.FixtureRequest, smollm2_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Every ChatOpenAI the suite builds (some build their own) talks to the test server."""
    reason = BEYOND_THE_MODEL.get(request.node.originalname)
    if reason is not None:
        pytest.skip(f"asserts of the model {reason}")
    monkeypatch.setenv("OPENAI_API_BASE", smollm2_server.base_url + "/v1")  # ChatOpenAI's
    monkeypatch.setenv("OPENAI_BASE_URL", smollm2_server.base_url + "/v1")  # the SDK's
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    yield


class TestWinnowChatOpenAI(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "model": DEFAULT_MODEL,
            "temperature": 0,
            "max_tokens": 300,
            "stream_usage": True,
            "frequency_penalty": 1.0,
            "max_retries": 0,
        }

    @property
    def supports_json_mode(self) -> bool:
        return True
