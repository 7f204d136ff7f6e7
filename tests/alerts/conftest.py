"""Fixtures for the alert tests: a real SQLite store, real local HTTP receivers."""

from __future__ import annotations

import pytest

from alerts_support import Receiver
from tailmon.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'alerts.db'}").open()
    yield s
    s.close()


@pytest.fixture
def receiver():
    """receiver(**options) -> a started Receiver, stopped after the test."""
    started = []

    def make(**options) -> Receiver:
        r = Receiver(**options).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()
