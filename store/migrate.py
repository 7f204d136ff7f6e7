"""Creating and upgrading the store's schema with Alembic, in one transaction, under a lock.

`upgrade_schema` brings a database to the head revision of store/migrations:

* a fresh database gets every revision;
* a database of the release before Alembic (its `schema_version` table, no revision recorded) is
  stamped at the revision of its schema version, then upgraded;
* a database newer than this code (a revision it does not know, or a schema version above the
  number of its revisions) is refused before anything is touched: this code would misread it.

All of it runs in one transaction (both backends have transactional DDL), so a failed upgrade
leaves the database as it was. Alembic runs programmatically, without alembic.ini or env.py: a
ScriptDirectory reads the revisions, a MigrationContext on that transaction's connection applies
them one by one and records each.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, func, insert, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from tailmon.errors import InputError, RuntimeFailure
from tailmon.store.connection import error_reason
from tailmon.store.schema import UTCDateTime, utcnow

if TYPE_CHECKING:
    from alembic.script import Script, ScriptDirectory

log = logging.getLogger(__name__)

# Alembic (1.18 and later) logs each autogenerate plugin it registers on import, at INFO: seven
# lines of noise in the daemon's log, which autogenerates nothing. Hence this level, set before
# alembic is first imported (the functions below import it). Its migration messages stay.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

# Not Alembic's default `alembic_version`: a PostgreSQL database shared with another application
# that uses Alembic would mix that application's revisions with ours.
VERSION_TABLE = "tailmon_alembic_version"
_VERSIONS = Table(VERSION_TABLE, MetaData(), Column("version_num", String(32), primary_key=True))

# The bookkeeping of the release before Alembic: one row per applied schema version (1..3), and
# that release refuses a database whose highest version is above its own. This code reads it only
# while no Alembic revision is recorded, and keeps writing it: one row per applied revision,
# numbered by its position in the history. So that release still opens a database with its own
# schema (an instance not yet upgraded, or rolled back, on a database another instance has
# upgraded) and refuses, with its own "newer than this tailmon supports", one that a later
# revision changed. Dropping the table would make it fail on "table runs already exists" instead,
# and leaving it as it is would make it misread a database that revision 0004 has changed.
LEGACY_TABLE = Table(
    "schema_version", MetaData(),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String, nullable=False),
    Column("applied_at", UTCDateTime(), nullable=False),
)

# Every key of pg_advisory_xact_lock is global to the database: this one serialises schema
# upgrades when several instances start at once on an empty database.
_MIGRATION_LOCK_KEY = 0x7461696C6D6F6E  # "tailmon"

# alembic.op is a process-wide proxy to the MigrationContext being applied: two threads upgrading
# two databases at once take turns. Taken after the database's lock, released before its commit.
_ALEMBIC_OP = threading.Lock()


@functools.cache
def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS_DIR), version_locations=[str(MIGRATIONS_DIR)])


@functools.cache
def history() -> tuple[Script, ...]:
    """Every revision, the first one first."""
    return tuple(reversed(list(_scripts().walk_revisions())))


def head_revision() -> str:
    return history()[-1].revision


def recorded_revisions(conn: Connection) -> list[str]:
    """The revisions in the database's Alembic version table; none before the first upgrade."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return []
    return list(conn.execute(select(_VERSIONS.c.version_num)).scalars())


def legacy_version(conn: Connection) -> int:
    """The highest schema version in the release-before-Alembic bookkeeping; 0 without any."""
    if not inspect(conn).has_table(LEGACY_TABLE.name):
        return 0
    return conn.execute(select(func.max(LEGACY_TABLE.c.version))).scalar() or 0


def upgrade_schema(engine: Engine, target: str = "head", *, display_url: str | None = None) -> str:
    """Apply the revisions up to `target` that the database lacks; return its revision after.

    `display_url` names the database in errors and in the log (default: the engine's URL,
    password masked).
    """
    where = f"database {display_url or engine.url.render_as_string(hide_password=True)}"
    revisions = history()
    position = {script.revision: i for i, script in enumerate(revisions, 1)}
    target = revisions[-1].revision if target == "head" else target
    if target not in position:
        raise ValueError(f"no revision '{target}' in {MIGRATIONS_DIR}")

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Two instances starting together on an empty database must not both create tables.
            conn.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
        current, legacy = _current_revision(conn, where)
        # A database of the release before Alembic: its tables are those of revision `legacy`;
        # record that, then upgrade from there.
        stamp = current if legacy else None
        pending = revisions[position[current] if current else 0:position[target]]
        if stamp is None and not pending:
            return current
        _apply(conn, where, stamp, pending)
        current = pending[-1].revision if pending else current
        _record_legacy_versions(conn, revisions[:position[current]])

    # Logged once committed: an upgrade that fails leaves nothing applied, and says so in its error.
    if stamp is not None:
        log.info("%s: schema version %d of the release before Alembic recorded as revision %s",
                 where, position[stamp], stamp)
    for script in pending:
        log.info("%s: schema revision %s applied (%s)", where, script.revision, script.doc)
    return current


def _current_revision(conn: Connection, where: str) -> tuple[str | None, bool]:
    """(the database's revision, None for a database without tailmon tables; whether that
    revision comes from the bookkeeping of the release before Alembic). Refuses (RuntimeFailure)
    a database newer than this code."""
    revisions = history()
    position = {script.revision: i for i, script in enumerate(revisions, 1)}
    recorded = recorded_revisions(conn)
    unknown = [r for r in recorded if r not in position]
    if unknown:
        raise RuntimeFailure(f"{where}: schema revision {unknown[0]} is newer than this tailmon supports "
                             f"({revisions[-1].revision}); upgrade tailmon")
    if recorded:
        return max(recorded, key=position.__getitem__), False
    legacy = legacy_version(conn)
    if legacy > len(revisions):
        raise RuntimeFailure(f"{where}: schema version {legacy} is newer than this tailmon supports "
                             f"({len(revisions)}); upgrade tailmon")
    return (revisions[legacy - 1].revision, True) if legacy else (None, False)


def check_readable(conn: Connection, where: str) -> None:
    """For readers, which must not write: refuse (one line) a database this code cannot read as
    it is. Only the head revision is read: the queries name every column of the head schema, and
    an older schema lacks some (reading it would take a reader per revision). Upgrading is a
    writer's job: the daemon, or `tailmon run --once`, upgrades the schema when it opens the
    database."""
    current, _ = _current_revision(conn, where)
    head = head_revision()
    if current is None:
        raise InputError(f"{where}: no tailmon tables in it (the daemon creates them when it first starts)")
    if current != head:
        raise RuntimeFailure(f"{where}: schema revision {current} is older than this tailmon's ({head}); "
                             "start the daemon or `tailmon run --once`, which upgrade it, then read it")


def _apply(conn: Connection, where: str, stamp: str | None, pending: tuple[Script, ...]) -> None:
    """Record `stamp` (if any) as the database's revision, then apply and record each pending one."""
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    with _ALEMBIC_OP:
        # transactional_ddl: on SQLite too, since the engine begins every transaction itself.
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "transactional_ddl": True})
        if stamp is not None:
            context.stamp(_scripts(), stamp)
        for script in pending:
            try:
                with Operations.context(context):
                    script.module.upgrade()
            except DBAPIError as e:
                raise RuntimeFailure(f"{where}: migration {script.revision} ({script.doc}) failed: "
                                     f"{error_reason(e)}") from e
            context.stamp(_scripts(), script.revision)


def _record_legacy_versions(conn: Connection, applied: tuple[Script, ...]) -> None:
    """One `schema_version` row per applied revision (see LEGACY_TABLE), the missing ones only."""
    LEGACY_TABLE.create(conn, checkfirst=True)
    present = set(conn.execute(select(LEGACY_TABLE.c.version)).scalars())
    rows = [{"version": i, "description": script.doc, "applied_at": utcnow()}
            for i, script in enumerate(applied, 1) if i not in present]
    if rows:
        conn.execute(insert(LEGACY_TABLE), rows)
