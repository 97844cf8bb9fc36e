"""`winnow serve` started the way a vLLM user starts `vllm serve`: the flags take effect in a
real server process, and refused flags stop it before it loads anything."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import ServerProcess, start_server, stop_server
from winnow.models import Tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a river."},
]
# Nothing like the demo model's own template, so the rendered prompts cannot coincide.
TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def vllm_style_server(
    demo_model_dir: Path, template_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("vllm-style")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    log_path = folder / "server.log"
    proc = start_server(
        demo_model_dir,
        log_path,
        *("--model", str(demo_model_dir), "--chat-template", str(template_file)),
        *("--dtype", "float", "--tensor-parallel-size", "1", "--enable-prefix-caching"),
        *(
            "--max-logprobs",
            "2",
            "--seed",
            "5",
            "--enforce-eager",
            "--generation-config",
            str(folder),
        ),
        *("--uvicorn-log-level", "warning", "--disable-log-requests", "--disable-log-stats"),
        *("--max-model-len", "256", "--num-kv-blocks", "64"),
    )
    yield proc
    stop_server(proc)


def tokenize(server: ServerProcess) -> list[int]:
    response = httpx.post(
        server.base_url + "/tokenize", json={"model": server.model, "messages": MESSAGES}
    )
    response.raise_for_status()
    tokens: list[int] = response.json()["tokens"]
    return tokens


def test_chat_template_flag_changes_the_rendered_prompt(
    vllm_style_server: ServerProcess,
    server: ServerProcess,
    demo_model_dir: Path,
    template_file: Path,
) -> None:
    expected = Tokenizer.from_pretrained(demo_model_dir, chat_template=str(template_file))
    tokens = tokenize(vllm_style_server)
    assert tokens == expected.render_chat(MESSAGES)
    assert tokens != tokenize(server)  # the same model without --chat-template
    completion = vllm_style_server.client().chat.completions.create(
        model=vllm_style_server.model,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=2,
    )
    assert completion.usage is not None and completion.usage.prompt_tokens == len(tokens)


def test_max_logprobs_flag_caps_top_logprobs(vllm_style_server: ServerProcess) -> None:
    client = vllm_style_server.client()
    ok = client.chat.completions.create(
        model=vllm_style_server.model,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=1,
        logprobs=True,
        top_logprobs=2,
    )
    assert ok.choices[0].logprobs is not None
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=vllm_style_server.model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=1,
            logprobs=True,
            top_logprobs=3,
        )
    assert refused.value.body["param"] == "top_logprobs"  # type: ignore[index]


def test_generation_config_sets_the_defaults_of_omitted_fields(
    vllm_style_server: ServerProcess,
) -> None:
    client = vllm_style_server.client()
    fields: dict[str, Any] = {
        "model": vllm_style_server.model,
        "prompt": "Once upon a time",
        "max_tokens": 6,
    }
    omitted = [client.completions.create(**fields).choices[0].text for _ in range(2)]
    greedy = client.completions.create(temperature=0, **fields).choices[0].text
    sampled = client.completions.create(temperature=2, seed=1, **fields).choices[0].text
    assert omitted == [greedy, greedy] != [sampled, sampled]


def test_uvicorn_log_level_silences_access_lines(vllm_style_server: ServerProcess) -> None:
    tokenize(vllm_style_server)
    assert "POST /tokenize" not in vllm_style_server.log()


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["-tp", "3", "--nnodes", "2"], "3 ranks do not split evenly over 2 nodes"),
        (["--generation-config", "/no/such/dir"], "not 'auto', 'vllm' or a folder"),
    ],
)
def test_refused_flags_exit_non_zero_with_the_reason(flags: list[str], reason: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "winnow", "serve", "demo", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert reason in result.stderr


def test_bench_serve_shows_a_progress_bar_and_no_request_log(server: ServerProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "winnow", "bench", "serve", "--base-url", server.base_url]
        + ["--model", server.model, "--num-prompts", "3", "--concurrency", "3"]
        + ["--input-len", "4", "--output-len", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Requests: 100%" in result.stderr and "3/3" in result.stderr
    assert "HTTP Request" not in result.stderr + result.stdout
    assert "completed requests      3" in result.stdout


def test_model_load_shows_progress(vllm_style_server: ServerProcess) -> None:
    assert "Loading weights: 100%" in vllm_style_server.log()
