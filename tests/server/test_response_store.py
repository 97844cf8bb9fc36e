"""The SQLite response store's retention: records past the TTL are gone, and beyond the size
limit the oldest are dropped when a new one is written."""

from __future__ import annotations

import json
import time
from pathlib import Path

from winnow.server.response_store import Retention, SqliteStore, StoredResponse, open_store


def record(name: str, created_at: float) -> StoredResponse:
    return StoredResponse(name, created_at, json.dumps({"id": name}), "[]")


def test_size_limit_drops_the_oldest(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3", Retention(ttl_s=3600, max_responses=2))
    now = time.time()
    for i in range(3):
        store.put(record(f"r{i}", now + i))
    assert store.get("r0") is None
    assert store.get("r1") == record("r1", now + 1)
    assert store.get("r2") is not None


def test_expired_records_are_gone(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3", Retention(ttl_s=60, max_responses=10))
    store.put(record("old", time.time() - 61))
    store.put(record("new", time.time()))
    assert store.get("old") is None and store.get("new") is not None
    assert store.delete("new") and not store.delete("new")


def test_the_file_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    retention = Retention(ttl_s=60, max_responses=10)
    open_store(f"sqlite:///{path}", retention).put(record("kept", time.time()))  # type: ignore[union-attr]
    again = open_store(f"sqlite:///{path}", retention)
    assert again is not None and again.get("kept") is not None
    assert open_store("none", retention) is None
