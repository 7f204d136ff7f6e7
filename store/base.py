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
from tailmon.store.connection import error_reason, connect_database
from tailmon.store.migrate import upgrade_schema
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

    # -- lifecycle

    def open(self: _Self) -> _Self:
        """Connect and create or upgrade the schema. Idempotent."""
        if self._engine is not None:
            return self
        engine = connect_database(self.url)
        try:
            upgrade_schema(engine, display_url=self.safe_url)
        except RuntimeFailure:
            engine.dispose()
            raise
        except DBAPIError as e:
            engine.dispose()
            raise RuntimeFailure(f"database {self.safe_url}: {self._mask(error_reason(e))}") from e
        self._engine = engine
        return self

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
        """One transaction; database errors become RuntimeFailure naming the database."""
        try:
            with self.engine.begin() as conn:
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
