"""Databases as the release before Alembic left them, from what tests/store/data recorded of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailmon.store.connection import connect_database

DATA = Path(__file__).with_name("data")


@pytest.fixture(scope="session")
def legacy_ddl() -> dict:
    """{backend: {version: [[statement, parameters], ...]}}: that release's SQL for each schema version."""
    return json.loads((DATA / "legacy-ddl.json").read_text())


@pytest.fixture
def legacy_database(legacy_ddl):
    """legacy_database(url, version) -> an engine on `url` (the caller disposes of it) holding the
    schema versions 1..version exactly as that release created them: its recorded SQL, replayed."""

    def build(url: str, version: int):
        engine = connect_database(url)
        with engine.begin() as conn:
            for v in range(1, version + 1):
                for statement, parameters in legacy_ddl[conn.dialect.name][str(v)]:
                    # SQLite's driver took positional parameters, psycopg named ones.
                    if isinstance(parameters, list):
                        parameters = tuple(parameters)
                    conn.exec_driver_sql(statement, parameters or None)
        return engine

    return build
