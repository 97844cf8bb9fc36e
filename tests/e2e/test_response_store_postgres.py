"""Two replicas sharing stored responses through one real PostgreSQL (started by the test from
the `pgserver` wheel): a response stored by one is retrieved, continued and deleted through
the other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import ServerProcess, start_server, stop_server

pgserver = pytest.importorskip("pgserver")


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="module")
def replicas(
    demo_model_dir: Path, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    logs = tmp_path_factory.mktemp("replicas")
    started: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            log = logs / f"{name}.log"
            started.append(start_server(demo_model_dir, log, "--response-store", postgres_url))
        yield started[0], started[1]
    finally:
        for proc in started:
            stop_server(proc)


def test_replicas_share_conversations(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = (replica.client() for replica in replicas)
    first = a.responses.create(model="demo", input="Hello from A", max_output_tokens=4)
    assert b.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = b.responses.create(
        model="demo", previous_response_id=first.id, input="And from B", max_output_tokens=4
    )
    items = a.responses.input_items.list(second.id, order="asc").data
    assert [getattr(item, "role", None) for item in items] == ["user", "assistant", "user"]
    assert items[1].id == first.output[0].id
    a.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.create(model="demo", previous_response_id=first.id, input="again")
