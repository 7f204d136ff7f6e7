"""The run store: database URL and engine, schema and its migrations, runs, alert state."""

from tailmon.store.database import Store, default_database_url, resolve_database_url, safe_url, to_jsonable

__all__ = ["Store", "default_database_url", "resolve_database_url", "safe_url", "to_jsonable"]
