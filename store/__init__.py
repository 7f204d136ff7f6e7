"""The run store: every estimation run, its per-prompt estimates, optional samples, and alerts.

One `Store` per daemon process, on SQLite (the default, a file under the state directory) or
PostgreSQL (shared by several daemon instances). The guarantees the daemon relies on:

* A run is inserted as `running` before any model work and closed (`succeeded`, `failed` or
  `interrupted`) together with its figures, estimates and samples in ONE transaction, so a crash
  leaves a `running` row with no results, never results that look complete.
* Several instances may share one PostgreSQL database. A per-monitor lock (`try_lock`) keeps one
  monitor from running twice at once across instances. Runs and locks record their owner
  (instance id and a random per-process token) and a heartbeat; `interrupt_stale_runs` only
  touches runs whose heartbeat is stale or whose owner is a previous incarnation of this very
  instance, so a starting instance never interrupts a live peer's run.
* The schema is versioned by Alembic revisions (store/migrations, applied by `migrate`): an
  upgrade keeps the data, and a database newer than this code is refused.
* Readers take no write lock: the query methods run in a transaction that only reads (on SQLite
  a deferred BEGIN, which in WAL mode reads a snapshot while a writer holds the lock; every
  writing transaction begins IMMEDIATE), and `open(read_only=True)` (the CLI's readers) neither
  migrates nor writes, reads a read-only file, and refuses a missing database or one not at this
  code's revision.
* Prompt and response texts go through `redact()` before they are stored.

Times are timezone-aware UTC `datetime`s in and out on both backends. Dicts returned by the
query methods hold plain values and these datetimes; `to_jsonable()` turns them into ISO 8601
strings for JSON output. Every database failure surfaces as
`RuntimeFailure("database <url with password masked>: <what>: <reason>")`.

The modules: `url` (which database), `connection` (how to connect), `schema` (the tables),
`migrate` and `migrations` (creating and upgrading them), `base` (connection, transactions,
ownership), `runs`, `locks` and `alerts` (the Store's parts), `reports` and `values` (what goes in).
"""

from tailmon.store.alerts import AlertStore
from tailmon.store.locks import LockStore
from tailmon.store.runs import RunStore
from tailmon.store.url import default_database_url, resolve_database_url, safe_url
from tailmon.store.values import to_jsonable


class Store(RunStore, LockStore, AlertStore):
    """The run store on one database. Thread-safe: every method runs its own transaction."""


__all__ = ["Store", "default_database_url", "resolve_database_url", "safe_url", "to_jsonable"]
