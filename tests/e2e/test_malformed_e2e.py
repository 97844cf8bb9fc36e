"""A few of the malformed-input cases against the real server process, through the OpenAI SDK:
each is its 400 with `param` naming the field, nothing is logged as a crash, and the server
keeps serving."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.e2e.conftest import ServerProcess

USER = [{"role": "user", "content": "hi"}]


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


CASES = [
    ("min-tokens-2-pow-63-without-max-tokens", {"min_tokens": 2**63}, "min_tokens"),
    ("min-tokens-int64-max", {"min_tokens": 2**63 - 1}, "min_tokens"),
    ("seed-2-pow-64", {"seed": 2**64, "max_tokens": 2}, "seed"),
    ("top-k-2-pow-63", {"top_k": 2**63, "max_tokens": 2}, "top_k"),
    ("logit-bias-above-100", {"logit_bias": {"5": 101}, "max_tokens": 2}, "logit_bias"),
    ("stop-string-over-cap", {"stop": "x" * 1025, "max_tokens": 2}, "stop"),
    (
        "chat-template-kwargs-480-deep",
        {"chat_template_kwargs": {"x": nested(480)}, "max_tokens": 2},
        "chat_template_kwargs",
    ),
]


@pytest.mark.parametrize(("fields", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_field_is_a_400_from_the_real_server(
    server: ServerProcess, fields: dict[str, Any], param: str
) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=server.model, messages=USER, extra_body=fields)  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    reply = client.chat.completions.create(model=server.model, messages=USER, max_tokens=2)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_the_crash_case_logs_no_traceback(server: ServerProcess) -> None:
    client = server.client()
    before = len(server.log())
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=server.model,
            messages=USER,  # type: ignore[arg-type]
            extra_body={"min_tokens": 2**63},
        )
    assert server.process.poll() is None
    log = server.log()[before:]
    assert "Traceback" not in log and "engine loop died" not in log, log[-3000:]
