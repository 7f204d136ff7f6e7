"""What every part of the Store shares: its connection, one transaction per call, its clock, and
who it is (instance id and process token) for the rows it owns."""

from __future__ import annotations

import os
import secrets
import socket
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Iterator, TypeVar

from sqlalchemy import Engine, Table, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from tailmon.errors import InputError, RuntimeFailure
from tailmon.store.connection import READING, connect_database, error_reason
from tailmon.store.migrate import check_readable, upgrade_schema
from tailmon.store.schema import utcnow
from tailmon.store.url import mask_password, safe_url


def _pid_alive(token: str) -> bool:
    """Whether the process that wrote `token` ("<pid>-<random>") still runs on this host."""
    pid = token.split("-", 1)[0]
    if not pid.isdigit():
        return False  # a token from before pids were recorded: its process is long gone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


_Self = TypeVar("_Self", bound="StoreBase")


class StoreBase:
    """The store's connection and identity; the runs, locks and alerts parts build on it."""

    def __init__(self, url: str, *, instance_id: str | None = None, stale_after_s: float = 300.0):
        if not (isinstance(stale_after_s, (int, float)) and stale_after_s > 0):
            raise InputError(f"stale_after_s must be > 0, got {stale_after_s!r}")
        self.url = url
        self.safe_url = safe_url(url)
        self.instance_id = instance_id or socket.gethostname()
        # A fresh token per Store object, "<pid>-<random>": tells this process's runs from those
        # of another process with the same instance id. That process is certainly dead when its
        # pid is gone from this host (killed and restarted); a live one (a `tailmon run --once`
        # beside the daemon) keeps its runs and locks.
        self.token = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.stale_after_s = float(stale_after_s)
        self.stale_after = timedelta(seconds=self.stale_after_s)
        self._engine: Engine | None = None
        self._read_only = False

    # -- lifecycle

    def open(self: _Self, *, read_only: bool = False) -> _Self:
        """Connect and create or upgrade the schema. Idempotent.

        read_only: for readers (the CLI's `runs` and `alerts list`): connect without writing
        anything, the schema included, and refuse the store's writing methods. The database must
        exist and be at this code's schema revision (see migrate.check_readable).
        """
        if self._engine is not None:
            return self
        try:
            engine = self._open_for_reading() if read_only else self._open_for_writing()
        except DBAPIError as e:
            raise RuntimeFailure(f"database {self.safe_url}: {self._mask(error_reason(e))}") from e
        self._engine = engine
        self._read_only = read_only
        return self

    def _open_for_writing(self) -> Engine:
        engine = connect_database(self.url)
        try:
            upgrade_schema(engine, display_url=self.safe_url)
        except BaseException:
            engine.dispose()
            raise
        return engine

    def _open_for_reading(self) -> Engine:
        engine = connect_database(self.url, read_only=True)
        try:
            self._check_readable(engine)
        except DBAPIError as e:
            engine.dispose()
            if engine.dialect.name != "sqlite" or "readonly" not in error_reason(e):
                raise
            # A WAL database whose -shm/-wal files neither exist nor can be created (its folder is
            # read-only: a copy on read-only media): SQLite reads it only as immutable. Nobody can
            # be writing it then, short of a writer with more rights than this reader.
            engine = connect_database(self.url, read_only=True, immutable=True)
            try:
                self._check_readable(engine)
            except BaseException:
                engine.dispose()
                raise
        except BaseException:
            engine.dispose()
            raise
        return engine

    def _check_readable(self, engine: Engine) -> None:
        with engine.connect() as conn:
            conn.execution_options(**{READING: True})
            with conn.begin():
                check_readable(conn, f"database {self.safe_url}")

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self: _Self) -> _Self:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeFailure(f"database {self.safe_url}: the store is not open")
        return self._engine

    def _mask(self, text: str) -> str:
        return mask_password(self.url, text)

    @contextmanager
    def _tx(self, what: str) -> Iterator[Connection]:
        """One transaction that writes (on SQLite it takes the write lock at BEGIN); database
        errors become RuntimeFailure naming the database."""
        if self._read_only:
            raise RuntimeFailure(f"database {self.safe_url}: {what}: the store is open for reading only")
        try:
            with self.engine.begin() as conn:
                yield conn
        except DBAPIError as e:
            raise RuntimeFailure(f"database {self.safe_url}: {what}: {self._mask(error_reason(e))}") from e

    @contextmanager
    def _read(self, what: str) -> Iterator[Connection]:
        """One transaction that only reads: it takes no write lock (SQLite: a deferred BEGIN; in
        WAL mode it reads a snapshot while a writer holds the lock), so a reader neither waits for
        the daemon nor needs write access. Errors as for _tx."""
        try:
            with self.engine.connect() as conn:
                conn.execution_options(**{READING: True})
                with conn.begin():
                    yield conn
        except DBAPIError as e:
            raise RuntimeFailure(f"database {self.safe_url}: {what}: {self._mask(error_reason(e))}") from e

    def _now(self, conn: Connection) -> datetime:
        # On PostgreSQL the server's clock is the one clock every instance shares: heartbeats
        # written by one host and judged stale by another never depend on their clock skew.
        if conn.dialect.name == "postgresql":
            return conn.execute(select(func.now())).scalar_one().astimezone(timezone.utc)
        return utcnow()

    # -- ownership of runs and locks

    def _owned_by_me(self, table: Table):
        return (table.c.owner_instance == self.instance_id) & (table.c.owner_token == self.token)

    def _previous_incarnation(self, conn: Connection, table: Table):
        """Rows owned by a dead process of this instance id (same host, pid no longer running)."""
        tokens = conn.execute(select(table.c.owner_token).distinct().where(
            table.c.owner_instance == self.instance_id, table.c.owner_token != self.token)).scalars().all()
        dead = [t for t in tokens if not _pid_alive(t)]
        return (table.c.owner_instance == self.instance_id) & table.c.owner_token.in_(dead)
