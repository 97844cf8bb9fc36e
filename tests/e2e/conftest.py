"""Real `winnow serve` processes on free loopback ports: the demo model, and the default model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import USER_CACHE_ROOT
from winnow.benchmark.process import free_port, wait_healthy
from winnow.models.default_model import DEFAULT_MODEL

STARTUP_TIMEOUT_S = 120


@dataclass
class ServerProcess:
    base_url: str
    model: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self) -> OpenAI:
        return OpenAI(
            base_url=self.base_url + "/v1",
            api_key="unused",
            _strict_response_validation=True,
            max_retries=0,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(model_dir: Path, log_path: Path, *extra_args: str) -> ServerProcess:
    return launch(["serve", str(model_dir), "--served-model-name", "demo", *extra_args], log_path)


def launch(
    serve_args: list[str], log_path: Path, model: str = "demo", env: dict[str, str] | None = None
) -> ServerProcess:
    """`python -m winnow SERVE_ARGS --port FREE`, waited for until healthy."""
    port = free_port()
    command = [sys.executable, "-m", "winnow", *serve_args, "--port", str(port)]
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", model, process, log_path)
    try:
        wait_healthy(server.base_url, process, timeout_s=STARTUP_TIMEOUT_S)
    except RuntimeError as exc:
        process.kill()
        raise RuntimeError(f"{exc}:\n{server.log()}") from exc
    return server


def stop_server(server: ServerProcess) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    proc = start_server(demo_model_dir, log_path, "--max-num-seqs", "16")
    yield proc
    stop_server(proc)


@pytest.fixture(scope="module")
def smollm2_server(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """`winnow serve` with no model, as a user starts it: the default SmolLM2-135M-Instruct, from
    the user's cache where the `smollm2_dir` fixture converted it."""
    log_path = tmp_path_factory.mktemp("real-model") / "server.log"
    serve_args = ["serve", "--max-model-len", "1024", "--max-num-seqs", "8"]
    serve_args += ["--kv-cache-memory", "0.25"]
    env = {"WINNOW_CACHE_DIR": str(USER_CACHE_ROOT)}
    proc = launch(serve_args, log_path, DEFAULT_MODEL, env)
    yield proc
    stop_server(proc)
