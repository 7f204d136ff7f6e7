"""The SQL prompt source against a real SQLite file, and an unreachable PostgreSQL."""

from __future__ import annotations

import collections
import sqlite3

import pytest
import sqlalchemy
from sqlalchemy import event

from tailmon.errors import InputError, RuntimeFailure
from tailmon.estimation.prompts import PromptItem
from tailmon.estimation.sources import SourceConfig, SourceError, SqlSource, build_source, sample_prompts

QUERY = "SELECT prompt, category FROM requests WHERE ts >= 100 ORDER BY id"


@pytest.fixture()
def database(tmp_path):
    path = tmp_path / "prod.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY, ts INTEGER, prompt TEXT, category TEXT, user TEXT)")
        db.executemany("INSERT INTO requests (ts, prompt, category, user) VALUES (?, ?, ?, ?)", [
            (50, "too old", "a", "u0"),
            (100, "  call me on 555-123-4567 \n", "a", "u1"),
            (101, "second", None, "u2"),
            (102, None, "a", "u3"),          # a request whose prompt was not logged
            (103, "   ", "b", "u4"),
            (104, "third", "b", "u5"),
        ])
    db.close()
    return path


def test_rows_stream_as_prompts_exactly_as_stored(database, caplog):
    source = SqlSource(f"sqlite:///{database}", QUERY)
    assert list(source.records()) == [PromptItem("  call me on 555-123-4567 \n", "a"), PromptItem("second"),
                                      PromptItem("third", "b")]
    assert (source.stats.records, source.stats.skipped) == (3, 2)
    assert "skipped 2 row(s)" in caplog.text


def test_text_field_picks_a_column_and_category_is_optional(database):
    source = SqlSource(f"sqlite:///{database}", "SELECT user, prompt FROM requests WHERE ts = 104", text_field="prompt")
    assert list(source.records()) == [PromptItem("third")]
    source = SqlSource(f"sqlite:///{database}", "SELECT prompt, user FROM requests WHERE ts = 104",
                       category_field="user")
    assert list(source.records()) == [PromptItem("third", "u5")]


@pytest.mark.parametrize(
    "query, fields, fragment",
    [
        ("SELECT prompt FROM requests", {"text_field": "body"}, "text_field 'body' is not a column of the query (columns: prompt)"),
        ("SELECT prompt FROM requests", {"category_field": "kind"}, "category_field 'kind' is not a column"),
        ("SELECT ts FROM requests", {}, "column 'ts' holds no prompt text in any of the 6 rows"),
    ],
)
def test_columns_that_do_not_fit_the_config_are_input_errors(database, query, fields, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as error:
        list(SqlSource(f"sqlite:///{database}", query, **fields).records())
    assert not isinstance(error.value, RuntimeFailure)


def test_the_query_runs_with_streaming_options(database):
    seen = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(dict(context.execution_options))

    event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", record)
    try:
        list(SqlSource(f"sqlite:///{database}", QUERY, batch_size=2).records())
    finally:
        event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", record)
    assert seen and seen[-1].get("stream_results") is True and seen[-1].get("yield_per") == 2


def test_a_failing_query_is_a_run_failure(database):
    with pytest.raises(SourceError, match=r"sql sqlite:///.*prod.db: the query failed: no such table: responses"):
        list(SqlSource(f"sqlite:///{database}", "SELECT prompt FROM responses").records())


def test_an_unreachable_database_fails_the_run_without_showing_the_password():
    # Port 1 on the loopback refuses at once; the password must not appear anywhere.
    url = "postgresql+psycopg://monitor:hunter2secret@127.0.0.1:1/prod?connect_timeout=5"
    source = SqlSource(url, "SELECT prompt FROM requests")
    assert source.describe() == "sql postgresql+psycopg://monitor:***@127.0.0.1:1/prod?connect_timeout=5"
    with pytest.raises(SourceError) as error:
        list(source.records())
    message = str(error.value)
    assert isinstance(error.value, RuntimeFailure)
    assert "hunter2secret" not in message and "monitor:***@127.0.0.1:1/prod" in message and "cannot connect" in message
    assert "\n" not in message


def test_an_unknown_dialect_is_an_input_error_with_a_masked_url():
    with pytest.raises(InputError, match=r"cannot use database URL nosuchdb://u:\*\*\*@h/d") as error:
        SqlSource("nosuchdb://u:hunter2secret@h/d", "SELECT 1")
    assert "hunter2secret" not in str(error.value)


def test_config_resolves_a_relative_sqlite_path_and_samples_by_category(database, tmp_path):
    with sqlite3.connect(database) as db:
        db.executemany("INSERT INTO requests (ts, prompt, category) VALUES (?, ?, ?)",
                       [(200, f"bulk {i}", "ab"[i % 4 == 0]) for i in range(400)])
    db.close()
    config = SourceConfig(type="sql", url="sqlite:///prod.db", per_run=8,
                          query="SELECT prompt, category FROM requests WHERE ts = 200")
    source = build_source(config, tmp_path)
    assert source.describe() == f"sql sqlite:///{database}"
    drawn = sample_prompts(source, config.per_run, seed=11)
    # 300 'a' and 100 'b' rows: quotas 6 and 2 exactly.
    assert collections.Counter(i.category for i in drawn) == {"a": 6, "b": 2}
    assert drawn == sample_prompts(source, config.per_run, seed=11)


@pytest.mark.parametrize("query", [
    "DROP TABLE requests",
    "DELETE FROM requests",
    "INSERT INTO requests (ts, prompt) VALUES (1, 'x') RETURNING prompt",
    "ATTACH DATABASE '{attach}' AS other",
    "PRAGMA query_only = OFF",
])
def test_the_sqlite_source_is_read_only(database, tmp_path, query):
    # Before: DROP TABLE dropped the production table and ATTACH created files.
    attach = tmp_path / "created-by-attach.db"
    source = SqlSource(f"sqlite:///{database}", query.format(attach=attach))
    with pytest.raises(SourceError, match="the query failed"):
        list(source.records())
    assert not attach.exists()
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM requests").fetchone() == (6,)
    db.close()
    # and reading still works, with joins, CTEs and functions
    ok = SqlSource(f"sqlite:///{database}", "WITH r AS (SELECT lower(prompt) AS p FROM requests WHERE ts = 104) "
                                            "SELECT p FROM r")
    assert list(ok.records()) == [PromptItem("third")]


@pytest.mark.parametrize("query", [
    "DROP TABLE requests",
    "DELETE FROM requests RETURNING prompt",
    "SELECT prompt FROM requests; DROP TABLE requests",
    "COMMIT; DROP TABLE requests",
])
def test_the_postgresql_source_is_read_only(postgres_url, query):
    import psycopg

    libpq = sqlalchemy.engine.make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute("CREATE TABLE requests (id serial PRIMARY KEY, prompt text)")
        conn.execute("INSERT INTO requests (prompt) VALUES ('first'), ('second')")
    url = sqlalchemy.engine.make_url(postgres_url).set(drivername="postgresql+psycopg").render_as_string(
        hide_password=False)
    # (the streaming cursor already refuses most of these: the read-only settings below hold
    # whatever way a driver runs the query)
    with pytest.raises(SourceError, match="the query failed"):
        list(SqlSource(url, query).records())
    with psycopg.connect(libpq, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM requests").fetchone() == (2,)
    ok = SqlSource(url, "SELECT prompt FROM requests ORDER BY id")
    assert list(ok.records()) == [PromptItem("first"), PromptItem("second")]
    # the query's own transaction is read-only, and so is any transaction of its session
    assert list(SqlSource(url, "SELECT current_setting('transaction_read_only')").records()) == [PromptItem("on")]
    assert list(SqlSource(url, "SELECT current_setting('default_transaction_read_only')").records()) == \
        [PromptItem("on")]
