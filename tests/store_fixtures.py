"""Fixtures for the tests of the run store and its users (daemon, CLI, sources): real databases only.

SQLite databases live in tmp_path. PostgreSQL needs a server: set TAILMON_TEST_POSTGRES_URL to a
server URL whose user may CREATE DATABASE (`.ci/start-postgres.sh DIR PORT` starts a throwaway
one and prints such a URL). Each test gets a fresh database, dropped afterwards. Without the
variable the PostgreSQL cases skip, unless TAILMON_REQUIRE_POSTGRES=1 makes them fail (CI).
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from sqlalchemy import update
from sqlalchemy.engine import make_url

POSTGRES_ENV = "TAILMON_TEST_POSTGRES_URL"
REQUIRE_ENV = "TAILMON_REQUIRE_POSTGRES"


def _postgres_server() -> str:
    server = os.environ.get(POSTGRES_ENV, "").strip()
    if not server:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {POSTGRES_ENV} is unset (start a server with .ci/start-postgres.sh)")
        pytest.skip(f"{POSTGRES_ENV} is unset: no PostgreSQL server to test against")
    return server


def _libpq(url) -> str:
    """A URL psycopg itself accepts: no SQLAlchemy '+driver' suffix."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def postgres_url():
    """URL of a fresh, empty PostgreSQL database on the test server; dropped after the test."""
    import psycopg

    server = make_url(_postgres_server())
    name = f"tailmon_test_{secrets.token_hex(6)}"
    # An unreachable server fails the test rather than skipping it: whoever set the variable
    # expects these tests to run.
    with psycopg.connect(_libpq(server), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq(server), autocommit=True) as conn:
            # FORCE: a connection a failed test left open must not keep the database alive.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'tailmon.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def make_store(db_url):
    """make_store(instance_id=..., **kw) -> an open Store on the test database, closed afterwards."""
    from tailmon.store import Store

    stores = []

    def make(instance_id: str = "host-a", **kw):
        store = Store(db_url, instance_id=instance_id, **kw).open()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store):
    return make_store()


@pytest.fixture
def backdate():
    """backdate(store, table, key_column, key, column, seconds): set a time column into the past,
    as a daemon that stopped heartbeating `seconds` ago would have left it."""

    def apply(store, table, key_column: str, key, column: str, seconds: float):
        when = datetime.now(timezone.utc) - timedelta(seconds=seconds)
        with store.engine.begin() as conn:
            conn.execute(update(table).where(table.c[key_column] == key).values({column: when}))

    return apply


@pytest.fixture
def build_report():
    """build_report(prompts, seed=0, n=40, volume=1e6) -> (report, samples).

    `report` is a real EstimationReport.to_dict() (the daemon stores exactly that), built from
    importance-sampling estimates on synthetic weights and scores; `samples` are the matching
    per-sample dicts finish_run takes. prompts: list of (text, category) or texts.
    """
    from tailmon.engines.base import Decoding, Variant
    from tailmon.estimators import importance_sampling
    from tailmon.judges import parse_judge
    from tailmon.estimation.pipeline import EstimationPlan, EstimationReport, PromptResult
    from tailmon.estimation.prompts import PromptItem
    from tailmon.proposals import parse_proposal

    def build(prompts, seed: int = 0, n: int = 40, volume: float | None = 1e6, responses=None):
        plan = EstimationPlan(target=Variant("target", Decoding(temperature=0.7, max_new_tokens=8)),
                              judge=parse_judge("prefix:Sure"), proposals=[parse_proposal("temperature:1.5")],
                              defensive=0.1, n_samples=n, seed=seed, volume=volume, window="1d")
        rng = np.random.default_rng(seed)
        results, samples = [], []
        for i, prompt in enumerate(prompts):
            text, category = (prompt, None) if isinstance(prompt, str) else prompt
            component = np.array([0] * (n // 10) + [1] * (n - n // 10))
            log_w = np.log(rng.uniform(0.05, 3.0, n))
            scores = (rng.random(n) < 0.3).astype(float)
            texts = [responses[i] if responses else f"Sure, reply {j}" for j in range(n)]
            est = importance_sampling(log_w, scores, component=component, defensive=0.1)
            results.append(PromptResult(PromptItem(text, category), est, texts, scores, log_w, component))
            samples += [{"prompt_index": i, "response": texts[j], "score": float(scores[j]),
                         "log_weight": float(log_w[j]), "component": int(component[j])} for j in range(n)]
        return EstimationReport("tiny", plan, results).to_dict(), samples

    return build
