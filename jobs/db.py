"""The database session lifecycle, in one place.

``get_engine`` builds (once per URL) an engine tuned for the backend: SQLite gets WAL, foreign
keys and a busy timeout so the embedded API and worker threads share it; Postgres gets
pre-ping so a restarted server costs one failed checkout, not a stream of errors.
``session_scope`` is the unit of work: commit on success, rollback on error, always close.
Repositories and the ledger never commit; the request or task boundary does.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from jobs.settings import Settings, get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _create_engine(url)
        return engine


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {},
    )


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    url = url or get_settings().database_url
    with _lock:
        factory = _factories.get(url)
    if factory is None:
        factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
        with _lock:
            _factories[url] = factory
    return factory


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """One transaction: commit if the block succeeds, roll back if it raises."""
    session = session_factory((settings or get_settings()).database_url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def ping(url: str | None = None) -> None:
    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))


def dispose_all(*, close: bool = True) -> None:
    """Drop pooled connections: in tests between databases, and in a forked child with
    ``close=False`` (the parent's connections must be forgotten, not closed under it)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=close)
        _engines.clear()
        _factories.clear()


def is_transient(exc: BaseException) -> bool:
    """A lost connection or a server restart: worth retrying, unlike a constraint violation."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_transient(
    fn: Callable[[], T],
    *,
    max_seconds: float,
    what: str = "database call",
    base_delay: float = 0.25,
    max_delay: float = 5.0,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient database errors with jittered backoff."""
    deadline = time.monotonic() + max_seconds
    delay = base_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning(
                "%s failed (attempt %d), retrying in %.1fs: %s",
                what,
                attempt,
                delay,
                type(exc).__name__,
                extra={"event": "db_retry"},
            )
            time.sleep(delay * (0.5 + random.random() / 2))
            delay = min(max_delay, delay * 2)
