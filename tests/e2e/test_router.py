"""Two `winnow serve` replicas behind the real vLLM router (`vllm-router` from the package
registry, in a venv of its own under the user's cache): both get traffic, every request is
answered, streaming included."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import USER_CACHE_ROOT
from tests.e2e.conftest import ServerProcess, start_server, stop_server
from winnow.benchmark.process import free_port

VLLM_ROUTER = "vllm-router==0.1.17"
TOOLS = USER_CACHE_ROOT / "test-tools"
REQUESTS = 16
MAX_TOKENS = 4


def router_binary() -> Path:
    """vllm-router installed once into its own venv (it pins its own FastAPI and uvicorn)."""
    venv = TOOLS / "vllm-router"
    binary = venv / "bin" / "vllm-router"
    marker = venv / "installed.txt"
    if binary.exists() and marker.exists() and marker.read_text() == VLLM_ROUTER:
        return binary
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", VLLM_ROUTER],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"cannot install {VLLM_ROUTER} (offline?): {result.stderr[-500:]}")
    marker.write_text(VLLM_ROUTER)
    return binary


@pytest.fixture(scope="module")
def replicas(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    folder = tmp_path_factory.mktemp("replicas")
    started: list[ServerProcess] = []
    try:
        for i in range(2):  # one after the other: two cold starts at once crowd a 2-core host
            started.append(start_server(demo_model_dir, folder / f"replica{i}.log"))
    except BaseException:
        for server in started:
            stop_server(server)
        raise
    yield started
    for server in started:
        stop_server(server)


@pytest.fixture(scope="module")
def router(
    replicas: list[ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    binary = router_binary()
    port = free_port()
    log_path = tmp_path_factory.mktemp("router") / "router.log"
    command = [str(binary), "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"]
    command += ["--worker-startup-check-interval", "1", "--worker-urls"]
    command += [server.base_url for server in replicas]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"vllm-router did not come up:\n{log_path.read_text(errors='replace')}")
    yield url
    process.terminate()
    process.wait(timeout=20)


def generated_tokens(server: ServerProcess) -> float:
    metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    match = re.search(r'^winnow:generation_tokens_total\{model_name="demo"\} (\S+)$', metrics, re.M)
    return float(match.group(1)) if match else 0.0


def ask(client: OpenAI, index: int) -> str:
    messages = [{"role": "user", "content": f"Request {index}."}]
    extra = {"ignore_eos": True}
    if index % 2:
        stream = client.chat.completions.create(
            model="demo", messages=messages, max_tokens=MAX_TOKENS, stream=True, extra_body=extra
        )
        reasons = [c.choices[0].finish_reason for c in stream if c.choices]
        return str(reasons[-1])
    reply = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=MAX_TOKENS, extra_body=extra
    )
    assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS
    return str(reply.choices[0].finish_reason)


def test_both_replicas_serve_behind_vllm_router(router: str, replicas: list[ServerProcess]) -> None:
    before = [generated_tokens(server) for server in replicas]
    client = OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0, timeout=60)
    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(lambda i: ask(client, i), range(REQUESTS)))
    assert reasons == ["length"] * REQUESTS
    served = [generated_tokens(server) - b for server, b in zip(replicas, before, strict=True)]
    assert sum(served) == REQUESTS * MAX_TOKENS
    assert all(tokens > 0 for tokens in served), served
