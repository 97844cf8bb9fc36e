"""Where stored responses live (`--response-store`): SQLite by default, PostgreSQL so that
replicas behind a router share conversations, or nowhere.

A record is the response object as answered and the conversation items it was generated from
(the previous response's items and output, then the request's own input): what
`GET /v1/responses/{id}`, `/input_items` and a later `previous_response_id` read back. Records
older than `--response-store-ttl` hours are gone; beyond `--response-store-max-responses` the
oldest are dropped when a new one is written. The backends are blocking: `AsyncResponseStore`
runs every call in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from winnow.models.model_cache import cache_root

SQLITE_FILE = "responses.sqlite3"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS winnow_responses ("
    "id TEXT PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL, "
    "response TEXT NOT NULL, items TEXT NOT NULL)"
)
_INDEX = "CREATE INDEX IF NOT EXISTS winnow_responses_created ON winnow_responses (created_at)"


@dataclass(frozen=True)
class StoredResponse:
    id: str
    created_at: float
    response: str  # the response object's JSON
    items: str  # the conversation items' JSON (a list)


@dataclass(frozen=True)
class Retention:
    ttl_s: float
    max_responses: int


class ResponseStore(Protocol):
    def put(self, record: StoredResponse) -> None: ...

    def get(self, response_id: str) -> StoredResponse | None: ...

    def delete(self, response_id: str) -> bool: ...


class SqlStore:
    """The SQL both backends share; `_run` executes one statement in a transaction.

    Parameters are written `%s` (psycopg's style); the SQLite backend translates them.
    """

    def __init__(self, retention: Retention) -> None:
        self._retention = retention

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    # "no limit" before OFFSET: SQLite needs a LIMIT there, PostgreSQL spells it ALL
    _NO_LIMIT = "ALL"

    def _prune(self, now: float) -> None:
        self._run("DELETE FROM winnow_responses WHERE created_at < %s", (now - self._ttl,))
        self._run(
            "DELETE FROM winnow_responses WHERE id IN (SELECT id FROM winnow_responses "
            f"ORDER BY created_at DESC LIMIT {self._NO_LIMIT} OFFSET %s)",
            (max(self._retention.max_responses - 1, 0),),
        )

    @property
    def _ttl(self) -> float:
        return self._retention.ttl_s

    def put(self, record: StoredResponse) -> None:
        self._prune(time.time())
        self._run(
            "INSERT INTO winnow_responses (id, created_at, response, items) "
            "VALUES (%s, %s, %s, %s)",
            (record.id, record.created_at, record.response, record.items),
        )

    def get(self, response_id: str) -> StoredResponse | None:
        rows = self._run(
            "SELECT id, created_at, response, items FROM winnow_responses "
            "WHERE id = %s AND created_at >= %s",
            (response_id, time.time() - self._ttl),
        )
        return StoredResponse(*rows[0]) if rows else None

    def delete(self, response_id: str) -> bool:
        rows = self._run("DELETE FROM winnow_responses WHERE id = %s RETURNING id", (response_id,))
        return bool(rows)


class SqliteStore(SqlStore):
    """One file; one connection shared by the worker threads under a lock (SQLite writes one
    at a time anyway)."""

    _NO_LIMIT = "-1"

    def __init__(self, path: Path, retention: Retention) -> None:
        super().__init__(retention)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)
        self._db.execute(_INDEX)

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql.replace("%s", "?"), params).fetchall()


class PostgresStore(SqlStore):
    """A small psycopg connection pool; the table is created on first connection."""

    def __init__(self, url: str, retention: Retention) -> None:
        super().__init__(retention)
        from psycopg_pool import ConnectionPool  # only servers that use PostgreSQL need it

        self._pool = ConnectionPool(url, min_size=1, max_size=4, open=True)
        self._run(_SCHEMA)
        self._run(_INDEX)

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._pool.connection() as conn, conn.cursor() as cursor:
            cursor.execute(sql, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description is not None else []


def open_store(spec: str, retention: Retention) -> ResponseStore | None:
    """The backend `--response-store` names: `sqlite` (a file under the cache directory),
    `sqlite:///PATH`, `postgresql://...` (or `postgres://`), or `none`."""
    if spec == "none":
        return None
    if spec == "sqlite":
        return SqliteStore(cache_root() / SQLITE_FILE, retention)
    if spec.startswith("sqlite:///"):
        return SqliteStore(Path(spec.removeprefix("sqlite://")).expanduser(), retention)
    if spec.startswith(("postgresql://", "postgres://")):
        return PostgresStore(spec, retention)
    raise ValueError(f"unknown response store '{spec}'")


class AsyncResponseStore:
    """The store seen from the event loop: opened on first use, each call in a worker thread."""

    def __init__(self, spec: str, retention: Retention) -> None:
        self._spec = spec
        self._retention = retention
        self._store: ResponseStore | None = None
        self._lock = asyncio.Lock()
        self.enabled = spec != "none"

    async def _backend(self) -> ResponseStore | None:
        if self._store is None and self.enabled:
            async with self._lock:
                if self._store is None:
                    self._store = await asyncio.to_thread(open_store, self._spec, self._retention)
        return self._store

    async def put(self, record: StoredResponse) -> None:
        store = await self._backend()
        if store is not None:
            await asyncio.to_thread(store.put, record)

    async def get(self, response_id: str) -> StoredResponse | None:
        store = await self._backend()
        return None if store is None else await asyncio.to_thread(store.get, response_id)

    async def delete(self, response_id: str) -> bool:
        store = await self._backend()
        return False if store is None else await asyncio.to_thread(store.delete, response_id)
