"""SQLAlchemy engines for the backbone registry and the APDB: SQLite by default, any URL unchanged.

SQLite files are opened in write-ahead-log mode, so that readers (a
``dmstream backbone query`` or an APDB query while a night runs) never block
the writer nor the writer them, and with a busy timeout, so that two
processes writing at once wait for each other instead of failing with
"database is locked".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

#: Seconds a SQLite writer waits for another process's write transaction to end.
SQLITE_BUSY_TIMEOUT = 60.0


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across application crashes in WAL mode; only a power cut can lose the
    # last commits, which the producers of the data (Kafka offsets not yet committed) redo.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(url: str) -> sa.Engine:
    """An engine for ``url``; for a SQLite file, its directory is created and WAL mode set.

    Parameters
    ----------
    url : str
        Any SQLAlchemy URL, e.g. ``sqlite:////data/registry.sqlite3`` or
        ``postgresql+psycopg://user@host/db``.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT})
    sa.event.listen(engine, "connect", _on_sqlite_connect)
    return engine


def insert_ignoring_duplicates(engine: sa.Engine, table: sa.Table) -> sa.Insert:
    """An INSERT that skips rows whose primary or unique key is already present (SQLite, PostgreSQL)."""
    backend = engine.dialect.name
    if backend == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif backend == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise NotImplementedError(f"no insert-or-ignore for {backend}: use SQLite or PostgreSQL")
    return insert(table).on_conflict_do_nothing()
