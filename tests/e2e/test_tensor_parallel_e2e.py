"""`winnow serve demo -tp 2` end to end: the OpenAI SDK against rank 0, a SIGTERM drain after
which every process exits 0; two "nodes" on localhost; and a worker rank that dies (SIGKILL,
on the second node) or raises in its forward: every stream ends with an error event and
[DONE], /health answers 503, the server exits non-zero within 30 s and no worker process is
left. Three servers in all, each started once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ServerProcess, launch
from winnow.benchmark.process import free_port

DEATH_DEADLINE_S = 30
FAULT_HOOK = Path(__file__).parent / "tp_fault"


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def assert_gone(pids: list[int], server: ServerProcess) -> None:
    """Every one of `pids` (the server's children: the worker and multiprocessing's resource
    tracker, which leaves once its last client has) exits within a few seconds."""
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {pid: _cmdline(pid) for pid in pids if alive(pid)}
    assert left == {}, server.log()


def serve_tp2(log_path: Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    args = ["serve", "demo", "-tp", "2", "--max-num-seqs", "8", "--disable-log-stats", *extra]
    return launch(args, log_path, env=env)


def chat_body(max_tokens: int) -> dict[str, object]:
    return {
        "model": "demo",
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


def stream_events(server: ServerProcess, max_tokens: int, started: threading.Event) -> list[str]:
    """Every SSE data payload of one streamed chat; `started` is set at the first chunk."""
    events: list[str] = []
    with (
        httpx.Client(base_url=server.base_url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=chat_body(max_tokens)) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                started.set()
    return events


def watch_health(server: ServerProcess, statuses: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            statuses.append(httpx.get(server.base_url + "/health", timeout=2).status_code)
        except httpx.HTTPError:
            return  # the server has closed its port
        time.sleep(0.02)


def assert_fails_cleanly(server: ServerProcess, workers: list[int], kill: int | None) -> None:
    """Two streams in flight; a fault (SIGKILL of `kill`, or None: the injected exception,
    already armed) must end both with an error event and [DONE], turn /health to 503, and the
    server must exit non-zero within DEATH_DEADLINE_S, leaving none of `workers`."""
    assert workers, "no worker process"
    started = [threading.Event(), threading.Event()]
    results: list[list[str]] = [[], []]

    def run(index: int) -> None:
        results[index] = stream_events(server, 1500, started[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for event in started:
        assert event.wait(60)
    statuses: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_health, args=(server, statuses, stop))
    watcher.start()
    t0 = time.monotonic()
    if kill is not None:
        os.kill(kill, signal.SIGKILL)
    for thread in threads:
        thread.join(DEATH_DEADLINE_S)
    code = server.process.wait(DEATH_DEADLINE_S - (time.monotonic() - t0))
    stop.set()
    watcher.join()
    assert code != 0, server.log()
    assert time.monotonic() - t0 < DEATH_DEADLINE_S
    for events in results:
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])
        assert "error" in error and "engine" in error["error"]["message"], error
    assert 503 in statuses, statuses
    assert_gone(workers, server)


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    return serve_tp2(tmp_path_factory.mktemp("tp2") / "server.log")


def test_openai_sdk_against_tp2(tp_server: ServerProcess) -> None:
    client = tp_server.client()
    reply = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=12,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=12,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reply.choices[0].message.content  # greedy: the same tokens streamed
    completions = client.completions.create(model="demo", prompt="a b c", max_tokens=5, n=2)
    assert len(completions.choices) == 2


def test_sigterm_drains_and_every_process_exits_0(tp_server: ServerProcess) -> None:
    workers = children(tp_server.process.pid)
    assert len(workers) >= 1
    started = threading.Event()
    events: list[str] = []
    reader = threading.Thread(target=lambda: events.extend(stream_events(tp_server, 40, started)))
    reader.start()
    assert started.wait(60)
    tp_server.process.send_signal(signal.SIGTERM)
    reader.join(60)
    assert tp_server.process.wait(60) == 0, tp_server.log()
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"]
    assert_gone(workers, tp_server)
    assert "rank 1 stopped" in tp_server.log()


def test_exception_in_a_worker_forward(tmp_path: Path) -> None:
    env = {
        "PYTHONPATH": os.pathsep.join([str(FAULT_HOOK), os.environ.get("PYTHONPATH", "")]),
        "WINNOW_TEST_FAIL_STEP": "40",
    }
    server = serve_tp2(tmp_path / "server.log", env=env)
    try:
        assert_fails_cleanly(server, children(server.process.pid), kill=None)
        assert "injected fault in a worker's forward" in server.log()
    finally:
        server.process.kill()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_two_nodes_on_localhost_and_sigkill_of_the_remote_worker(tmp_path: Path) -> None:
    """Node 1 runs rank 1 only (no HTTP server); node 0 serves across both. Then rank 1 is
    SIGKILLed mid-stream: node 0 fails cleanly and node 1 exits non-zero too."""
    port = str(free_port())
    nodes = ["-tp", "2", "--nnodes", "2", "--master-port", port, "--disable-log-stats"]
    node1_log = tmp_path / "node1.log"
    with node1_log.open("wb") as log:
        node1 = subprocess.Popen(
            [sys.executable, "-m", "winnow", "serve", "demo", *nodes, "--node-rank", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    node0: ServerProcess | None = None
    try:
        node0 = launch(["serve", "demo", *nodes, "--node-rank", "0"], tmp_path / "node0.log")
        reply = node0.client().completions.create(model="demo", prompt="a b", max_tokens=6)
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        workers = [pid for pid in children(node1.pid) if "spawn_main" in _cmdline(pid)]
        assert len(workers) == 1
        assert_fails_cleanly(node0, workers, kill=workers[0])
        assert node1.wait(DEATH_DEADLINE_S) != 0, node1_log.read_text()
        assert "rank 1" in node1_log.read_text()
    finally:
        node1.kill()
        if node0 is not None:
            node0.process.kill()
