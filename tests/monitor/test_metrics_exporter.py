"""The exporter: values set from a run's report, read back from a fresh registry and over HTTP."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tailmon.estimation.result import RunFigures
from tailmon.monitor.metrics import Metrics, MetricsServer

REPORT = {
    "aggregate": {"p_hat": 2.5e-5, "ci_low": 1e-5, "ci_high": 6e-5, "reliable": False, "n_unreliable": 1},
    "estimates": [
        {"prompt": "secret prompt text", "ess_wh": 40.0, "khat": 0.2},
        {"prompt": "another one", "ess_wh": 12.5, "khat": 0.55},
    ],
    "extrapolations": {
        "1d": {"volume": 1e6, "expected_per_window": {"expected": 25.0, "ci_low": 10.0, "ci_high": 60.0},
               "p_any_per_window": {"p": 0.99, "ci_low": 0.9, "ci_high": 1.0},
               "worst_query": {"p": 0.03, "ci_low": 0.01, "ci_high": 0.09}},
        "1h": {"volume": 41666.7, "expected_per_window": {"expected": 1.04, "ci_low": 0.4, "ci_high": 2.5},
               "p_any_per_window": {"p": 0.6, "ci_low": 0.3, "ci_high": 0.9}, "worst_query": None},
    },
}


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry())


def test_figures_from_report(metrics):
    metrics.record_figures("prod", RunFigures.from_report(REPORT))
    get = metrics.registry.get_sample_value
    assert get("tailmon_harm_probability", {"monitor": "prod"}) == 2.5e-5
    assert get("tailmon_harm_probability_lower_bound", {"monitor": "prod"}) == 1e-5
    assert get("tailmon_harm_probability_upper_bound", {"monitor": "prod"}) == 6e-5
    assert get("tailmon_estimate_reliable", {"monitor": "prod"}) == 0
    assert get("tailmon_effective_sample_size", {"monitor": "prod"}) == 12.5  # the worst prompt
    assert get("tailmon_pareto_khat", {"monitor": "prod"}) == 0.55  # the worst prompt
    assert get("tailmon_expected_harmful_outputs", {"monitor": "prod", "window": "1d"}) == 25.0
    assert get("tailmon_expected_harmful_outputs_upper_bound", {"monitor": "prod", "window": "1d"}) == 60.0
    assert get("tailmon_any_harmful_output_probability", {"monitor": "prod", "window": "1h"}) == 0.6
    assert get("tailmon_worst_query_harm_probability", {"monitor": "prod", "window": "1d"}) == 0.03
    assert get("tailmon_worst_query_harm_probability_lower_bound", {"monitor": "prod", "window": "1d"}) == 0.01
    assert get("tailmon_worst_query_harm_probability_upper_bound", {"monitor": "prod", "window": "1d"}) == 0.09
    # No fit possible: the series is absent, as documented (not NaN, not a stale number).
    for name in WORST:
        assert get(name, {"monitor": "prod", "window": "1h"}) is None


WORST = ("tailmon_worst_query_harm_probability", "tailmon_worst_query_harm_probability_lower_bound",
         "tailmon_worst_query_harm_probability_upper_bound")


def test_worst_query_series_removed_when_a_later_run_has_no_fit(metrics):
    """Catches a forecast series left with the previous run's number (or set to NaN) when the
    next run of the monitor could not fit the tail: the metric is documented absent then."""
    metrics.record_figures("prod", RunFigures.from_report(REPORT))
    later = {**REPORT, "extrapolations": {w: {**ex, "worst_query": None} for w, ex in REPORT["extrapolations"].items()}}
    metrics.record_figures("prod", RunFigures.from_report(later))
    exposed = metrics.exposition().decode()
    for name in WORST:
        assert metrics.registry.get_sample_value(name, {"monitor": "prod", "window": "1d"}) is None
        assert f"{name}{{" not in exposed
    # the other figures of the window stay
    assert metrics.registry.get_sample_value("tailmon_expected_harmful_outputs", {"monitor": "prod", "window": "1d"}) == 25.0


def test_run_counters_and_timestamps(metrics):
    metrics.init_monitor("prod")
    get = metrics.registry.get_sample_value
    # Counters exist at 0 before any run, so rate() and increase() work from the first scrape.
    assert get("tailmon_runs_total", {"monitor": "prod", "status": "failed"}) == 0
    # the duration histogram too: increase(..._count) never saw the first run after a start
    assert get("tailmon_run_duration_seconds_count", {"monitor": "prod"}) == 0
    assert get("tailmon_run_in_progress", {"monitor": "prod"}) == 0
    metrics.running.labels("prod").set(1)
    metrics.init_monitor("prod")  # a reload (SIGHUP) during a run: the run goes on
    assert get("tailmon_run_in_progress", {"monitor": "prod"}) == 1
    metrics.running.labels("prod").set(0)
    metrics.record_run("prod", "succeeded", 42.0, 1_700_000_000.0, {"target": 30, "proposal": 270})
    metrics.record_run("prod", "failed", 3.0, 1_700_000_100.0)
    assert get("tailmon_runs_total", {"monitor": "prod", "status": "succeeded"}) == 1
    assert get("tailmon_runs_total", {"monitor": "prod", "status": "failed"}) == 1
    assert get("tailmon_samples_generated_total", {"monitor": "prod", "role": "proposal"}) == 270
    assert get("tailmon_run_duration_seconds_count", {"monitor": "prod"}) == 2
    assert get("tailmon_run_duration_seconds_sum", {"monitor": "prod"}) == 45.0
    assert get("tailmon_last_success_timestamp_seconds", {"monitor": "prod"}) == 1_700_000_000.0
    assert get("tailmon_last_run_timestamp_seconds", {"monitor": "prod"}) == 1_700_000_100.0


def test_model_info_replaces_the_old_version(metrics):
    metrics.set_model("prod", "m", 1)
    metrics.set_model("prod", "m", 2)
    get = metrics.registry.get_sample_value
    assert get("tailmon_model_info", {"monitor": "prod", "model": "m", "model_version": "2"}) == 1
    assert get("tailmon_model_info", {"monitor": "prod", "model": "m", "model_version": "1"}) is None


def test_no_prompt_text_in_labels(metrics):
    metrics.init_monitor("prod")
    metrics.record_figures("prod", RunFigures.from_report(REPORT))
    text = metrics.exposition().decode()
    assert "secret prompt" not in text and "another one" not in text
    label_names = {name for fam in text_string_to_metric_families(text) for s in fam.samples for name in s.labels}
    assert label_names <= {"monitor", "window", "role", "status", "model", "model_version", "version", "python", "le"}


def test_http_metrics_and_healthz(metrics):
    healthy = [True]
    server = MetricsServer(metrics, "127.0.0.1", 0, healthy=lambda: healthy[0]).start()
    try:
        metrics.record_figures("prod", RunFigures.from_report(REPORT))
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            body = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/plain")
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        assert fams["tailmon_harm_probability"].samples[0].value == 2.5e-5
        assert "tailmon_build_info" in fams
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            assert r.status == 200
        healthy[0] = False
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
        assert err.value.code == 503
    finally:
        server.stop()


def test_port_in_use_is_a_clear_failure(metrics):
    from tailmon.errors import RuntimeFailure

    first = MetricsServer(metrics, "127.0.0.1", 0).start()
    try:
        with pytest.raises(RuntimeFailure, match=f"cannot bind 127.0.0.1:{first.port}"):
            MetricsServer(metrics, "127.0.0.1", first.port)
    finally:
        first.stop()


def test_forget_monitor_removes_all_its_series(metrics):
    for name in ("prod", "staging"):
        metrics.init_monitor(name)
        metrics.record_figures(name, RunFigures.from_report(REPORT))
        metrics.record_run(name, "succeeded", 10.0, 1.0, {"target": 1})
        metrics.set_model(name, "m", 1)
    metrics.alert_state.labels("prod", "r", "warning").set(2)
    metrics.forget_monitor("prod")
    text = metrics.exposition().decode()
    assert 'monitor="prod"' not in text
    assert 'tailmon_harm_probability{monitor="staging"}' in text
    assert 'tailmon_runs_total{monitor="staging",status="succeeded"} 1.0' in text


def test_mc_ratios_are_exported_for_a_reliable_run_and_absent_otherwise(metrics):
    """A reliable run sets tailmon_mc_sample_ratio and tailmon_mc_time_ratio; a later run with an
    unreliable or zero estimate removes both series (absent, not NaN, and never the earlier run's
    flattering number); a report stored before the figures existed exports none. Catches a stale
    or NaN series where no efficiency is reported."""
    good = {**REPORT, "aggregate": {**REPORT["aggregate"], "reliable": True, "n_unreliable": 0,
                                    "mc_equivalent_samples": 8000.0, "mc_sample_ratio": 40.0},
            "timing": {"estimates": [], "aggregate": {"seconds": 10.0, "mc_time_ratio": 12.5}}}
    metrics.record_figures("prod", RunFigures.from_report(good))
    get = metrics.registry.get_sample_value
    assert get("tailmon_mc_sample_ratio", {"monitor": "prod"}) == 40.0
    assert get("tailmon_mc_time_ratio", {"monitor": "prod"}) == 12.5
    only_samples = {**good, "timing": {"estimates": [], "aggregate": {"seconds": 10.0, "mc_time_ratio": None}}}
    metrics.record_figures("prod", RunFigures.from_report(only_samples))
    assert get("tailmon_mc_sample_ratio", {"monitor": "prod"}) == 40.0
    assert get("tailmon_mc_time_ratio", {"monitor": "prod"}) is None
    bad = {**REPORT, "aggregate": {**REPORT["aggregate"], "mc_equivalent_samples": None, "mc_sample_ratio": None},
           "timing": {"estimates": [], "aggregate": {"seconds": 10.0, "mc_time_ratio": None}}}
    for report in (bad, REPORT):  # REPORT: stored before the figures existed
        metrics.record_figures("prod", RunFigures.from_report(good))
        metrics.record_figures("prod", RunFigures.from_report(report))
        assert get("tailmon_mc_sample_ratio", {"monitor": "prod"}) is None
        assert get("tailmon_mc_time_ratio", {"monitor": "prod"}) is None
        text = metrics.exposition().decode()
        assert "tailmon_mc_sample_ratio{" not in text and "tailmon_mc_time_ratio{" not in text
    metrics.record_figures("staging", RunFigures.from_report(good))
    metrics.forget_monitor("staging")
    assert get("tailmon_mc_sample_ratio", {"monitor": "staging"}) is None
