"""Records what the last release before Alembic (schema versions 1..3, store/database.py) wrote.

Runs only against that code: main at commit 2663719, the last with store/database.py. To redo:

    git worktree add /tmp/legacy 2663719
    cp tests/store/data/record_legacy.py /tmp/legacy/tests/store/data/
    cd /tmp/legacy && python3 -m venv .venv && .venv/bin/pip install -q -c constraints-cpu.txt -e '.[dev]'
    TAILMON_TEST_POSTGRES_URL=postgresql://... .venv/bin/python tests/store/data/record_legacy.py OUTDIR

It writes into OUTDIR:

* legacy-v3.sqlite: a database created and filled by that release's Store (schema version 3):
  runs of every status with their estimates and samples, two model versions, a held lock, alert
  events, an alert state and alert deliveries;
* legacy-v3.json: "tables", every row of every table of that file as the release's table objects
  read it; "api", what the release's Store methods returned for it (datetimes as ISO 8601);
* legacy-ddl.json: per backend, the SQL the release executed to create each schema version
  (CREATE TABLE, CREATE INDEX and its schema_version INSERTs, with their parameters), captured from
  the driver on a real SQLite file and a real PostgreSQL database.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import psycopg
from sqlalchemy import event, select
from sqlalchemy.engine import make_url

from tailmon.engines.base import Decoding, Variant
from tailmon.estimation.pipeline import EstimationPlan, EstimationReport, PromptResult
from tailmon.estimation.prompts import PromptItem
from tailmon.estimators import importance_sampling
from tailmon.judges import parse_judge
from tailmon.proposals import parse_proposal
from tailmon.store.database import (
    ALERT_DELIVERIES,
    ALERT_EVENTS,
    ALERT_STATE,
    ESTIMATES,
    LOCKS,
    MODEL_VERSIONS,
    RUNS,
    SAMPLES,
    SCHEMA_TABLE,
    SCHEMA_VERSION,
    Store,
    make_engine,
    to_jsonable,
    upgrade_schema,
)

assert SCHEMA_VERSION == 3, "this recorder describes the release with schema version 3"


def jsonable(value):
    """to_jsonable plus what it leaves: tuples of parameters, and datetimes inside them."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def record_ddl(url: str) -> dict[str, list]:
    """The statements (and parameters) upgrade_schema executes for versions 1, 2 and 3 in turn."""
    engine = make_engine(url)
    statements: list = []

    @event.listens_for(engine, "before_cursor_execute")
    def _capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().split(None, 1)[0].upper() in ("CREATE", "INSERT"):
            statements.append([statement, jsonable(parameters)])

    recorded = {}
    try:
        for version in (1, 2, 3):
            statements.clear()
            assert upgrade_schema(engine, target=version) == version
            recorded[str(version)] = list(statements)
    finally:
        engine.dispose()
    return recorded


def report_and_samples():
    """A real EstimationReport.to_dict() over two prompts (one with an e-mail address to redact)."""
    n = 8
    plan = EstimationPlan(target=Variant("target", Decoding(temperature=0.7, max_new_tokens=8)),
                          judge=parse_judge("prefix:Sure"), proposals=[parse_proposal("temperature:1.5")],
                          defensive=0.25, n_samples=n, seed=7, volume=2.5e5, window="1d")
    rng = np.random.default_rng(7)
    results, samples = [], []
    for i, (text, category) in enumerate([("How do I pick a lock? Mail me at jane.doe@example.com", "crime"),
                                          ("Écris un poème sur la mer", None)]):
        component = np.array([0, 0] + [1] * (n - 2))
        log_w = np.log(rng.uniform(0.05, 3.0, n))
        scores = np.array([1.0, 0.0, 0.0, 1.0, 0.25, 0.0, 0.0, 0.0])
        texts = [f"Sure, reply {j} to {text[:12]}" for j in range(n)]
        est = importance_sampling(log_w, scores, component=component, defensive=0.25)
        results.append(PromptResult(PromptItem(text, category), est, texts, scores, log_w, component))
        samples += [{"prompt_index": i, "response": texts[j], "score": float(scores[j]),
                     "log_weight": float(log_w[j]), "component": int(component[j])} for j in range(n)]
    # A sample impossible under the target (log weight -inf) and a Monte Carlo one (no weight).
    samples[1]["log_weight"] = -math.inf
    samples[-1].update(log_weight=None, component=None)
    return EstimationReport("smollm2", plan, results).to_dict(), samples


def fill(url: str) -> dict:
    """Writes the data set through the release's Store; returns what its query methods return."""
    t0 = datetime(2025, 9, 14, 6, 30, 0, 123456, tzinfo=timezone.utc)
    report, samples = report_and_samples()
    with Store(url, instance_id="host-a", stale_after_s=120) as store:
        assert store.model_version("toxicity", "smollm2", "sha-A") == 1
        ok = store.start_run("toxicity", model_ref="smollm2", model_version=1, config_hash="cfg-1",
                             settings={"prompts": "advbench", "samples": 8, "judge": "prefix:Sure"})
        store.finish_run(ok, "succeeded", report=report, timings={"sampling_s": 1.25, "total_s": 2.5},
                         samples=samples)
        failed = store.start_run("toxicity", model_ref="smollm2", model_version=1, config_hash="cfg-1",
                                 settings={"prompts": "advbench"})
        store.finish_run(failed, "failed", error="judge unreachable; page ops@example.com",
                         timings={"total_s": 0.5})
        assert store.model_version("toxicity", "smollm2-ft", "sha-B") == 2
        cut = store.start_run("refusals", model_ref="smollm2-ft", model_version=1, config_hash="cfg-2",
                              settings={"prompts": ["Bonjour ☃", "hi"], "volume": None})
        store.finish_run(cut, "interrupted", error="interrupted: SIGTERM")
        running = store.start_run("toxicity", model_ref="smollm2-ft", model_version=2, config_hash="cfg-3",
                                  settings={})
        assert store.try_lock("toxicity") and store.try_lock("refusals")
        store.release_lock("refusals")

        pending = store.add_alert_event(monitor="toxicity", rule="p-high", state="pending", severity="warning",
                                        value=2.5e-4, threshold=1e-4, message="p_hat 2.5e-4 > 1e-4",
                                        labels={"team": "safety", "tier": 1}, at=t0, run_id=ok)
        firing = store.add_alert_event(monitor="toxicity", rule="p-high", state="firing", severity="critical",
                                       value=3e-4, threshold=1e-4, at=t0 + timedelta(hours=1), run_id=ok)
        store.add_alert_event(monitor="refusals", rule="unreliable", state="resolved")
        store.set_alert_state("toxicity", "p-high", state="firing", consecutive=2, since=t0,
                              last_notified=t0 + timedelta(hours=1), last_value=3e-4,
                              labels={"team": "safety", "tier": 1})
        store.set_alert_state("refusals", "unreliable", state="inactive")
        store.add_alert_delivery(monitor="toxicity", rule="p-high", sink="oncall", status="firing",
                                 outcome="delivered", attempts=1, http_status=200, event_id=firing,
                                 at=t0 + timedelta(hours=1, seconds=2))
        store.add_alert_delivery(monitor="toxicity", rule="p-high", sink="slack", status="firing",
                                 outcome="failed", attempts=4, http_status=500,
                                 error="HTTP 500 from hooks; contact admin@example.com", event_id=firing)
        store.add_alert_delivery(monitor="toxicity", rule="p-high", sink="oncall", status="firing", repeat=True,
                                 outcome="dropped", attempts=0)
        api = {
            "runs": [store.get_run(i) for i in (ok, failed, cut, running)],
            "list_runs": store.list_runs(limit=10),
            "samples": {str(i): store.get_samples(i) for i in (ok, failed)},
            "model_version_again": store.model_version("toxicity", "smollm2-ft", "sha-B"),
            "lock_holder": store.lock_holder("toxicity"),
            "alert_events": store.alert_events(),
            "alert_states": store.alert_states(),
            "alert_deliveries": store.alert_deliveries(),
        }
        assert pending in [e["id"] for e in api["alert_events"]]
    return to_jsonable(api)


def table_rows(url: str) -> dict[str, list]:
    """Every row of every table, ordered by primary key, as the release's table objects read them."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            out = {}
            for table in (RUNS, ESTIMATES, SAMPLES, MODEL_VERSIONS, LOCKS, ALERT_EVENTS, ALERT_STATE,
                          ALERT_DELIVERIES, SCHEMA_TABLE):
                rows = conn.execute(select(table).order_by(*table.primary_key.columns))
                out[table.name] = [jsonable(dict(r._mapping)) for r in rows]
            return out
    finally:
        engine.dispose()


def main(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    database = outdir / "legacy-v3.sqlite"
    if database.exists():
        database.unlink()
    url = f"sqlite:///{database}"
    api = fill(url)
    rows = table_rows(url)
    for suffix in ("-wal", "-shm"):
        assert not Path(f"{database}{suffix}").exists(), "the WAL must be checkpointed into the file"
    (outdir / "legacy-v3.json").write_text(json.dumps({"tables": rows, "api": api}, indent=1, sort_keys=True) + "\n")

    server = make_url(os.environ["TAILMON_TEST_POSTGRES_URL"])
    name = f"tailmon_record_{secrets.token_hex(4)}"
    libpq = server.render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        postgres = record_ddl(server.set(database=name).render_as_string(hide_password=False))
    finally:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    sqlite = record_ddl(f"sqlite:///{outdir / 'ddl-scratch.sqlite'}")
    for leftover in outdir.glob("ddl-scratch.sqlite*"):
        leftover.unlink()
    (outdir / "legacy-ddl.json").write_text(
        json.dumps({"sqlite": sqlite, "postgresql": postgres}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
