"""`SourceConfig`: the `prompts:` section of a monitor, its checks and messages; `build_source`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tailmon.estimation.sources import FileSource, LogDirectorySource, SourceConfig, SqlSource, build_source

EXAMPLES = {
    "file": "type: file\npath: prompts.jsonl\n",
    "logs": "type: logs\ndirectory: /var/log/llm\nglob: 'requests*.jsonl*'\nmax_files: 7\ncategory_field: route\n",
    "sql": ("type: sql\nurl: postgresql+psycopg://monitor:s3cret@db.internal/prod\n"
            "query: \"SELECT prompt, category FROM requests WHERE ts > now() - interval '1 day'\"\n"
            "text_field: prompt\nper_run: 50\ndedupe: true\nmin_chars: 5\nmax_chars: 2000\nstratify: false\n"),
}


def config(text: str) -> SourceConfig:
    return SourceConfig.model_validate(yaml.safe_load(text))


def test_defaults():
    c = config(EXAMPLES["file"])
    assert (c.glob, c.max_files, c.text_field, c.category_field) == ("*.jsonl*", None, None, None)
    assert (c.per_run, c.dedupe, c.min_chars, c.max_chars, c.stratify) == (20, False, 1, 8000, True)


def test_examples_build_their_sources(tmp_path):
    file = build_source(config(EXAMPLES["file"]), tmp_path)
    assert isinstance(file, FileSource) and file.path == tmp_path / "prompts.jsonl"
    assert file.describe() == f"file {tmp_path / 'prompts.jsonl'}"
    logs = build_source(config(EXAMPLES["logs"]), tmp_path)
    assert isinstance(logs, LogDirectorySource) and logs.directory == Path("/var/log/llm")  # absolute stays
    assert (logs.glob, logs.max_files, logs.category_field) == ("requests*.jsonl*", 7, "route")
    assert logs.describe() == "logs /var/log/llm/requests*.jsonl* (newest 7)"
    sql_config = config(EXAMPLES["sql"])
    sql = build_source(sql_config, tmp_path)
    assert isinstance(sql, SqlSource) and sql.text_field == "prompt"
    assert sql.describe() == "sql postgresql+psycopg://monitor:***@db.internal/prod"
    assert (sql_config.per_run, sql_config.dedupe, sql_config.min_chars, sql_config.max_chars,
            sql_config.stratify) == (50, True, 5, 2000, False)


def test_the_password_stays_out_of_repr():
    assert "s3cret" not in repr(config(EXAMPLES["sql"]))


def test_home_is_expanded_in_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    source = build_source(SourceConfig(type="file", path="~/p.jsonl"), tmp_path / "configs")
    assert source.path == tmp_path / "home" / "p.jsonl"


@pytest.mark.parametrize(
    "values, fragments",
    [
        ({"type": "file"}, ["type 'file' needs 'path'"]),
        ({"type": "logs"}, ["type 'logs' needs 'directory'"]),
        ({"type": "sql", "url": "sqlite:///x.db"}, ["type 'sql' needs 'query'"]),
        ({"type": "sql"}, ["type 'sql' needs 'url' and 'query'"]),
        ({"type": "file", "path": "p.jsonl", "directory": "d", "glob": "*"},
         ["type 'file' does not take 'directory', 'glob' (keys of type 'logs')"]),
        ({"type": "logs", "directory": "d", "query": "SELECT 1"}, ["type 'logs' does not take 'query' (keys of type 'sql')"]),
        ({"type": "sql", "url": "sqlite:///x.db", "query": "SELECT 1", "path": "p", "max_files": 2},
         ["does not take 'path', 'max_files'", "keys of type 'file' and 'logs'"]),
        ({"type": "csv", "path": "p"}, ["type", "Input should be 'file', 'logs' or 'sql'"]),
        ({"type": "file", "path": "p", "per_run": 0}, ["per_run", "greater than or equal to 1"]),
        ({"type": "file", "path": "p", "min_chars": 100, "max_chars": 10}, ["min_chars (100) must not exceed max_chars (10)"]),
        ({"type": "file", "path": "p", "min_chars": -1}, ["min_chars", "greater than or equal to 0"]),
        ({"type": "file", "path": "p", "sample": 5}, ["sample", "Extra inputs are not permitted"]),
        ({"type": "logs", "directory": "d", "glob": "/var/log/*.jsonl"}, ["glob must be a pattern relative to directory"]),
        ({"type": "logs", "directory": "d", "max_files": 0}, ["max_files", "greater than or equal to 1"]),
        ({"type": "file", "path": "p", "text_field": ""}, ["text_field", "at least 1 character"]),
        ({"type": "sql", "url": "sqlite:///x.db", "query": ""}, ["query", "at least 1 character"]),
        ({"type": "sql", "url": "sqlite:///x.db", "query": " \n "}, ["query", "query is blank"]),
        ({"type": "file", "path": "p", "dedupe": "sometimes"}, ["dedupe", "valid boolean"]),
    ],
)
def test_invalid_configs_name_the_key(values, fragments):
    with pytest.raises(ValidationError) as error:
        SourceConfig.model_validate(values)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message


def test_a_bad_database_url_is_reported_without_echoing_it():
    with pytest.raises(ValidationError) as error:
        SourceConfig(type="sql", url="postgresql://monitor:hunter2secret@db:notaport/prod", query="SELECT 1")
    message = str(error.value)
    assert "url is not a database URL" in message and "hunter2secret" not in message
    # Nor does any other error of the same config repeat the input it came with.
    with pytest.raises(ValidationError) as error:
        SourceConfig.model_validate({"type": "sql", "url": "sqlite:///x.db?p=hunter2secret", "query": "SELECT 1",
                                     "per_run": 0})
    assert "hunter2secret" not in str(error.value)
