"""A real `winnow serve` process on a free loopback port, serving the demo model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from winnow.benchmark.process import free_port, wait_healthy

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
    port = free_port()
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "winnow",
                "serve",
                str(model_dir),
                "--port",
                str(port),
                "--served-model-name",
                "demo",
                *extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", "demo", process, log_path)
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
