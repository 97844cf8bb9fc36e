"""`winnow serve demo --kernels triton` on a CPU, under Triton's interpreter: the CUDA path's
attention kernels and its decode-graph buckets (run eagerly) answer chat through the real server,
greedily the same as the default CPU kernels and as Hugging Face `generate`."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.e2e.conftest import ServerProcess, launch, stop_server
from winnow.models import Tokenizer

pytest.importorskip("triton")

MAX_TOKENS = 4
QUESTIONS = ["Name three colours.", "Count to five.", "Say hello in French, please."]


@pytest.fixture(scope="module")
def triton_server(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("triton-server") / "server.log"
    serve_args = ["serve", str(demo_model_dir), "--served-model-name", "demo"]
    serve_args += ["--kernels", "triton", "--max-num-seqs", "4", "--num-kv-blocks", "64"]
    serve_args += ["--max-model-len", "512"]  # two context splits per decode
    proc = launch(serve_args, log_path, env={"TRITON_INTERPRET": "1"})
    yield proc
    stop_server(proc)


def chat(server: ServerProcess, question: str) -> tuple[str, int]:
    response = server.client().chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert response.usage is not None
    return response.choices[0].message.content or "", response.usage.completion_tokens


def test_greedy_chat_equals_default_kernels_and_hf(
    triton_server: ServerProcess, server: ServerProcess, demo_model_dir: Path
) -> None:
    """Three chats at once (a decode batch of 3 runs in bucket 4, one padding row, then shrinks)
    give the default server's answers, and the first gives HF generate's."""
    log = triton_server.log()
    assert "Triton paged (interpreted) attention" in log
    assert "decode: static buffers for batch sizes [1, 2, 4], run eagerly" in log
    with ThreadPoolExecutor(max_workers=len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda q: chat(triton_server, q), QUESTIONS))
    assert answers == [chat(server, question) for question in QUESTIONS]

    tokenizer = Tokenizer.from_pretrained(demo_model_dir)
    prompt = tokenizer.render_chat([{"role": "user", "content": QUESTIONS[0]}])
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False
        )[0, len(prompt) :].tolist()
    assert answers[0] == (tokenizer.hf.decode(generated, skip_special_tokens=True), len(generated))
