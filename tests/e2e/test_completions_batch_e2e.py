"""A list of prompts on /v1/completions of a real server, read by the strict OpenAI SDK."""

from __future__ import annotations

from tests.e2e.conftest import ServerProcess

PROMPTS = ["Once upon a time", "The river runs", "Stone and water"]


def test_a_batch_answers_each_prompt_as_alone(server: ServerProcess) -> None:
    client = server.client()
    fields = {
        "model": server.model,
        "max_tokens": 3,
        "n": 2,
        "seed": 3,
        "temperature": 1.0,
        "extra_body": {"ignore_eos": True},
    }
    batch = client.completions.create(prompt=PROMPTS, **fields)  # type: ignore[call-overload]
    assert [choice.index for choice in batch.choices] == list(range(6))
    prompt_tokens = 0
    for i, prompt in enumerate(PROMPTS):
        alone = client.completions.create(prompt=prompt, **fields)  # type: ignore[call-overload]
        assert [c.text for c in batch.choices[2 * i : 2 * i + 2]] == [c.text for c in alone.choices]
        prompt_tokens += alone.usage.prompt_tokens
    assert batch.usage is not None
    assert (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (prompt_tokens, 18)
