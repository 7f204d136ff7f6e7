"""No credential reaches the store or the CLI's output (issue 18, item 2): a run's settings keep
the config's ${VAR} references unexpanded and mask the credentials written out; `runs show` and
`runs list` print neither; the daemon's log does not quote them. Real runs on the tiny model, a
real SQLite store, and (when a server is given) a real PostgreSQL prompts database."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import yaml
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from daemon_support import PROMPTS
from tailmon.cli.main import main
from tailmon.monitor.config import load_config
from tailmon.monitor.daemon import Daemon
from tailmon.monitor.metrics import Metrics
from tailmon.store import Store
from tailmon.store.schema import RUNS

ENV_TOKEN = "envtoken-5b1f"
LITERAL_PASSWORD = "literalpw-91c2"
LITERAL_KEY = "literalkey-7d3e"
SECRETS = (ENV_TOKEN, LITERAL_PASSWORD, LITERAL_KEY)


def monitor(name: str, model_dir, **keys) -> dict:
    return {"name": name, "model": {"ref": str(model_dir), "max_new_tokens": 3, "batch_size": 16},
            "prompts": {"type": "file", "path": "prompts.jsonl", "per_run": 3}, "judge": "prefix:Sure",
            "proposals": ["system:Sure"], "estimator": {"samples": 10, "defensive": 0.2, "seed": 7},
            "schedule": {"every": "1h"}, **keys}


def run_config(tmp_path, monitors: list[dict]) -> Daemon:
    (tmp_path / "prompts.jsonl").write_text(PROMPTS, encoding="utf-8")
    cfg = {"database": f"sqlite:///{tmp_path / 'tailmon.db'}", "metrics": {"port": 0}, "monitors": monitors}
    path = tmp_path / "tailmon.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return Daemon(load_config(path), metrics=Metrics(CollectorRegistry()))


def stored_settings_text(tmp_path) -> list[str]:
    """The runs.settings column as the database holds it (the JSON text), every run."""
    with Store(f"sqlite:///{tmp_path / 'tailmon.db'}") as store, store.engine.connect() as conn:
        return [json.dumps(row) for row in conn.execute(select(RUNS.c.settings)).scalars()]


def cli_outputs(tmp_path, run_ids, monkeypatch) -> str:
    """Everything `runs list` and `runs show` print, in both formats."""
    monkeypatch.setenv("TAILMON_DATABASE_URL", f"sqlite:///{tmp_path / 'tailmon.db'}")
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    out = []
    for args in [["runs", "list"], ["runs", "list", "--format", "json"],
                 *(["runs", "show", str(i), *fmt] for i in run_ids for fmt in ([], ["--format", "json"]))]:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        out.append(result.output)
    return "\n".join(out)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_settings_keep_references_and_mask_credentials(tmp_path, model_copy, monkeypatch, caplog):
    """Catches a run's settings stored with a value substituted from the environment (a token)
    or with a credential written in the config (a URL's password, a key in its query), and
    `runs show`/`runs list` printing either."""
    monkeypatch.setenv("TEST_RUNBOOK_URL", f"https://wiki.example/runbook?token={ENV_TOKEN}")
    monkeypatch.setenv("TEST_PROMPTS_FILE", "prompts.jsonl")
    rule = {"name": "harm-high", "metric": "harm_probability", "op": ">", "threshold": 0.99,
            "annotations": {"runbook": "${TEST_RUNBOOK_URL}",
                            "dashboard": f"https://ops:{LITERAL_PASSWORD}@grafana.example/d/x?api_key={LITERAL_KEY}"}}
    daemon = run_config(tmp_path, [monitor("tiny", model_copy, alerts=[rule],
                                           prompts={"type": "file", "path": "${TEST_PROMPTS_FILE}", "per_run": 3})])
    with caplog.at_level(logging.DEBUG):
        [outcome] = daemon.run_once()
    assert outcome.status == "succeeded", outcome.error

    [text] = stored_settings_text(tmp_path)
    assert not [s for s in SECRETS if s in text]
    with Store(f"sqlite:///{tmp_path / 'tailmon.db'}") as store:
        settings = store.get_run(outcome.run_id)["settings"]
    stored = settings["alerts"][0]["annotations"]
    assert stored == {"runbook": "${TEST_RUNBOOK_URL}",  # as written, never the environment's value
                      "dashboard": "https://ops:***@grafana.example/d/x?api_key=***"}
    assert settings["prompts"]["path"] == "${TEST_PROMPTS_FILE}"
    # Everything else is the validated config, defaults included.
    assert settings["estimator"]["samples"] == 10 and settings["estimator"]["confidence"] == 0.95

    printed = cli_outputs(tmp_path, [outcome.run_id], monkeypatch)
    assert "${TEST_RUNBOOK_URL}" in printed and "api_key=***" in printed  # `runs show --format json` has them
    assert not [s for s in SECRETS if s in printed]
    assert not [s for s in SECRETS if s in caplog.text]


def test_runs_stored_before_the_masking_are_masked_when_shown(tmp_path, monkeypatch):
    """Catches `runs show` printing the credentials that an older release stored verbatim."""
    with Store(f"sqlite:///{tmp_path / 'tailmon.db'}") as store:
        run_id = store.start_run("old", model_ref="m", model_version=1, config_hash="h", settings={})
        with store.engine.begin() as conn:  # as the release before this one wrote them
            conn.execute(RUNS.update().where(RUNS.c.id == run_id).values(
                settings={"prompts": {"type": "sql", "url": f"postgresql://r:{LITERAL_PASSWORD}@db/logs"}},
                error=f"cannot use https://h/v1?key={LITERAL_KEY}"))
    printed = cli_outputs(tmp_path, [run_id], monkeypatch)
    assert "postgresql://r:***@db/logs" in printed and "key=***" in printed
    assert LITERAL_PASSWORD not in printed and LITERAL_KEY not in printed


def test_a_postgresql_prompts_database_password_is_never_stored(tmp_path, model_copy, monkeypatch, postgres_url):
    """Catches the password of a real SQL prompt source's URL (given through ${VAR}, or written
    out) reaching runs.settings or the CLI's output. The test server trusts local connections,
    so the password is sent and ignored: the runs succeed."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    with psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False)) as conn:
        conn.execute("CREATE TABLE requests (prompt text, category text)")
        conn.execute("INSERT INTO requests VALUES ('a b', 'x'), ('ab!', 'y'), ('Sure a', 'x')")
    with_password = url.set(password=LITERAL_PASSWORD).render_as_string(hide_password=False)
    monkeypatch.setenv("TEST_PROMPTS_DB", url.set(password=ENV_TOKEN).render_as_string(hide_password=False))
    query = "SELECT prompt, category FROM requests"
    daemon = run_config(tmp_path, [
        monitor("from-env", model_copy, prompts={"type": "sql", "url": "${TEST_PROMPTS_DB}", "query": query}),
        monitor("written-out", model_copy, prompts={"type": "sql", "url": with_password, "query": query}),
    ])
    outcomes = daemon.run_once()
    assert [o.status for o in outcomes] == ["succeeded", "succeeded"], [o.error for o in outcomes]

    texts = stored_settings_text(tmp_path)
    assert len(texts) == 2 and not [s for s in SECRETS if any(s in t for t in texts)]
    with Store(f"sqlite:///{tmp_path / 'tailmon.db'}") as store:
        urls = [store.get_run(o.run_id)["settings"]["prompts"]["url"] for o in outcomes]
    assert urls == ["${TEST_PROMPTS_DB}", f"postgresql://{url.username}:***@{url.host}:{url.port}/{url.database}"]
    printed = cli_outputs(tmp_path, [o.run_id for o in outcomes], monkeypatch)
    assert not [s for s in SECRETS if s in printed]


def test_a_failing_source_s_credentials_stay_out_of_errors_logs_and_output(tmp_path, model_copy, caplog, capsys):
    """Catches the password in a database URL's query string (`?password=`) quoted by the error
    of a prompt source that cannot connect: in the stored error, the daemon's log, the printed
    outcome of `run --once`, and `runs show`."""
    from tailmon.cli.daemon import print_outcomes

    with __import__("socket").socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://reader@127.0.0.1:{port}/logs?password={LITERAL_PASSWORD}&sslmode=disable"
    daemon = run_config(tmp_path, [monitor("tiny", model_copy,
                                           prompts={"type": "sql", "url": url, "query": "SELECT prompt FROM r"})])
    with caplog.at_level(logging.INFO):
        [outcome] = daemon.run_once()
    assert outcome.status == "failed" and "cannot connect" in outcome.error
    assert "password=***" in outcome.error  # masked where the source names itself
    # Each way out masks on its own too: an error some other code wrote with a credential in it.
    from tailmon.monitor.daemon import RunOutcome, log as daemon_log

    raw = RunOutcome("other", None, "failed", error=f"cannot use https://h/v1?token={ENV_TOKEN}")
    with caplog.at_level(logging.INFO):
        daemon_log.error("monitor other: %s", raw.error)
    print_outcomes([outcome, raw], "json")
    print_outcomes([outcome, raw], "table")
    printed = capsys.readouterr().out
    assert f"127.0.0.1:{port}/logs?password=***&sslmode=disable" in printed
    with Store(f"sqlite:///{tmp_path / 'tailmon.db'}") as store:
        stored = store.get_run(outcome.run_id)
    assert "password=***" in stored["error"]
    assert "run 1 failed" in caplog.text  # the log has the failure ...
    assert "token=***" in printed and "token=***" in caplog.text
    for text in (printed, stored["error"], json.dumps(stored["settings"]), caplog.text):
        assert LITERAL_PASSWORD not in text and ENV_TOKEN not in text  # ... and nowhere the password


def test_an_endpoint_url_with_credentials_is_refused_without_echoing_them():
    """Catches the key of `endpoint:http://user:KEY@host` echoed by the config error ('@' starts
    the model, so what follows the user name reads as a port)."""
    from tailmon.monitor.config import ConfigError, parse_config

    cfg = {"monitors": [monitor("m", "smollm2-135m-instruct", judge=f"endpoint:http://user:{LITERAL_KEY}@127.0.0.1:9/v1")]}
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(cfg), "t.yaml")
    assert "invalid port" in str(info.value) and LITERAL_KEY not in str(info.value)
