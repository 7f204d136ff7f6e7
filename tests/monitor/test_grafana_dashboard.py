"""config/grafana/: the provisioned dashboard and its provisioning YAML.

No Grafana runs here. The dashboard's queries go through the PromQL checker of
test_prometheus_rules.py (exported metric names, their labels, the recording rules of
tailmon-rules.yml) and, where promtool is installed, through Prometheus's own parser; its
structure (uid, variables, datasource of every panel, log axis, threshold lines) is read from
the JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from test_prometheus_rules import (  # noqa: I001 (a sibling test module, importable under pytest's rootdir)
    PromQLChecker,
    PromQLError,
    checked_rules,
    cross_check_names,
    exported_series,
    load_rules,
    threshold_table,
)

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "config" / "grafana"
DASHBOARD = GRAFANA / "tailmon-dashboard.json"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "tailmon.yml"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DS_VAR = {"type": "prometheus", "uid": "${datasource}"}
UID = "tailmon-overview"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    """Every panel but rows, including those nested in collapsed rows."""
    out = []
    for p in dash["panels"]:
        if p["type"] == "row":
            out += p.get("panels", [])
        else:
            out.append(p)
    return out


def panel_using(dash: dict, metric: str) -> dict:
    found = [p for p in panels(dash) if any(re.search(rf"\b{metric}\b", t["expr"]) for t in p["targets"])]
    assert len(found) == 1, f"{metric}: expected one panel, found {[p['title'] for p in found]}"
    return found[0]


def variables(dash: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def variable_query(var: dict) -> str:
    # Grafana accepts a string or, in newer versions, {"query": ..., "qryType": ...}.
    q = var["query"]
    return q["query"] if isinstance(q, dict) else q


def red_step(panel: dict) -> float:
    (step,) = [s for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["color"] == "red"]
    return step["value"]


def check_dashboard(dash: dict) -> PromQLChecker:
    """Every query and variable query against the exporter and the rules file; returns the checker."""
    checker, _ = checked_rules(load_rules(), exported_series())
    checker.names_seen = set()  # from here on: what the dashboard uses
    for p in panels(dash):
        for t in p["targets"]:
            what = f"panel {p['title']!r} query {t['refId']}"
            try:
                checker.check(t["expr"])
            except PromQLError as exc:
                raise PromQLError(f"{what}: {exc}") from None
            cross_check_names(t["expr"], checker.last_names, what)
    for var in variables(dash).values():
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable_query(var).strip())
        assert m, f"variable {var['name']}: not a label_values(selector, label) query"
        value = checker.check(m[1])
        if m[2] not in value.labels:
            raise PromQLError(f"variable {var['name']}: its series have no label {m[2]!r}")
    return checker


def test_dashboard_identity():
    dash = load_dashboard()
    # A fixed uid keeps /d/tailmon-overview links and alert annotations valid across re-provisioning;
    # id null lets Grafana assign its own database id.
    assert dash["uid"] == UID
    assert dash["id"] is None
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["title"]


def test_variables():
    dash = load_dashboard()
    v = variables(dash)
    assert v["datasource"]["type"] == "datasource" and v["datasource"]["query"] == "prometheus"
    assert variable_query(v["monitor"]) == "label_values(tailmon_harm_probability, monitor)"
    assert re.fullmatch(r"label_values\(tailmon_model_info(\{.*\})?, model\)", variable_query(v["model"]))
    for name in ("monitor", "model"):
        assert v[name]["type"] == "query"
        assert v[name]["datasource"] == DS_VAR
        assert v[name]["includeAll"] and v[name]["multi"]
        # Panels select with =~: "All" must expand to a regex that matches every value.
        assert v[name]["allValue"] == ".*"
        assert v[name]["definition"] == variable_query(v[name])


def test_every_panel_uses_the_datasource_variable():
    dash = load_dashboard()
    assert panels(dash)
    for p in panels(dash):
        assert p["datasource"] == DS_VAR, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS_VAR, (p["title"], t["refId"])
            # The monitor picker applies to every per-monitor query (build info has no monitor).
            if "tailmon_build_info" not in t["expr"]:
                assert 'monitor=~"$monitor"' in t["expr"], (p["title"], t["refId"])


def test_harm_probability_panel_is_a_log_band():
    dash = load_dashboard()
    p = panel_using(dash, "tailmon_harm_probability_lower_bound")
    assert p["type"] == "timeseries"
    assert p["fieldConfig"]["defaults"]["custom"]["scaleDistribution"] == {"type": "log", "log": 10}
    legend = {re.match(r"\w+", t["expr"])[0]: t["legendFormat"] for t in p["targets"]}
    assert set(legend) == {"tailmon_harm_probability", "tailmon_harm_probability_lower_bound",
                           "tailmon_harm_probability_upper_bound"}
    # The band: the upper bound's series fills down to the lower bound's, matched by display name,
    # which is why the panel repeats per monitor (fixed names) rather than plotting all monitors.
    fills = {o["matcher"]["options"]: prop["value"] for o in p["fieldConfig"]["overrides"]
             for prop in o["properties"] if prop["id"] == "custom.fillBelowTo"}
    assert fills == {legend["tailmon_harm_probability_upper_bound"]: legend["tailmon_harm_probability_lower_bound"]}
    assert p["repeat"] == "monitor"
    assert "$monitor" in p["title"]


def test_thresholds_drawn_are_the_rules():
    dash = load_dashboard()
    table = threshold_table()
    harm = panel_using(dash, "tailmon_harm_probability_upper_bound")
    assert red_step(harm) == float(table["TailmonHarmProbabilityHigh"][0])
    khat = panel_using(dash, "tailmon_pareto_khat")
    assert red_step(khat) == 0.7 == float(table["TailmonParetoKhatHigh"][0])
    for p in (harm, khat):  # drawn as a line, not only as a colour
        assert p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"
    per_day = panel_using(dash, "monitor:tailmon_expected_harmful_outputs_upper_bound:per_day")
    assert red_step(per_day) == float(table["TailmonExpectedHarmfulOutputsHigh"][0])
    stale = panel_using(dash, "tailmon_last_success_timestamp_seconds")
    assert red_step(stale) == float(table["TailmonMonitorStale"][0])
    assert stale["fieldConfig"]["defaults"]["unit"] == "s"


def test_alert_state_panel_names_the_states():
    dash = load_dashboard()
    (p,) = [p for p in panels(dash) if p["type"] == "table" and "tailmon_alert_state" in p["targets"][0]["expr"]]
    mappings = [prop["value"] for o in p["fieldConfig"]["overrides"] for prop in o["properties"]
                if prop["id"] == "mappings"]
    (opts,) = [m["options"] for ms in mappings for m in ms if m["type"] == "value"]
    # tailmon_alert_state's help: 0 inactive or resolved, 1 pending, 2 firing.
    assert {k: v["text"] for k, v in opts.items()} == {"0": "inactive", "1": "pending", "2": "firing"}


def test_queries_use_exported_metrics_labels_and_rules():
    check_dashboard(load_dashboard())


def test_every_exported_metric_is_on_the_dashboard():
    exported = exported_series()
    used = check_dashboard(load_dashboard()).names_seen
    for family, samples in exported.families.items():
        shown = samples - {s for s in samples if s.endswith("_created")}  # counters' creation times
        assert shown & used, f"{family} is exported but on no panel"


@pytest.mark.parametrize("old,new,message", [
    ("tailmon_effective_sample_size{", "tailmon_effective_samples_size{", "is not emitted"),
    ("sum by (monitor, status) (increase(tailmon_runs_total", "sum by (monitor, state) (increase(tailmon_runs_total",
     "['state'] not on its argument"),
    ("tailmon_model_info{model=~", "tailmon_model_info{models=~", "has no label 'models'"),
    ("label_values(tailmon_harm_probability, monitor)", "label_values(tailmon_harm_probability, monitors)",
     "no label 'monitors'"),
    ("monitor:tailmon_expected_harmful_outputs:per_day{", "monitor:tailmon_expected_harmful_outputs:daily{",
     "is not defined"),
    ("increase(tailmon_samples_generated_total{", "increase(tailmon_samples_generated{", "is not emitted"),
], ids=["metric name", "by label", "selector label", "variable label", "recording rule", "counter suffix"])
def test_checker_rejects_doctored_dashboard(old, new, message):
    text = DASHBOARD.read_text()
    assert old in text  # the doctoring applies to the real file
    with pytest.raises(PromQLError, match=re.escape(message)):
        # Every occurrence: a variable's query is stored twice (definition and query).
        check_dashboard(json.loads(text.replace(old, new)))


def test_queries_parse_with_promtool(promtool, tmp_path):
    # Prometheus's own parser, by way of a rules file with one recording rule per query: promtool
    # parses each expression the way the Prometheus behind Grafana will.
    dash = load_dashboard()
    rules = [{"record": f"dashboard:query_{i}", "expr": t["expr"]}
             for i, t in enumerate(t for p in panels(dash) for t in p["targets"])]
    (tmp_path / "dashboard-queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", "dashboard-queries.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


@pytest.fixture
def promtool():
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("TAILMON_REQUIRE_PROMETHEUS") == "1":
        pytest.fail("TAILMON_REQUIRE_PROMETHEUS=1 but promtool is not installed (apt-get install prometheus)")
    pytest.skip("promtool not installed (apt-get install prometheus)")


def test_layout():
    dash = load_dashboard()
    ids = [p["id"] for p in dash["panels"]] + [q["id"] for p in dash["panels"] for q in p.get("panels", [])]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    cells = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_provisioning():
    provider = yaml.safe_load(PROVIDER.read_text())
    assert provider["apiVersion"] == 1
    (prov,) = provider["providers"]
    assert prov["type"] == "file"
    assert Path(prov["options"]["path"]).is_absolute()  # Grafana resolves it on its own host
    # The install command in the provider's comment puts the JSON into exactly that folder.
    assert f"{prov['options']['path']}/{DASHBOARD.name}" in PROVIDER.read_text()
    sources = yaml.safe_load(DATASOURCE.read_text())
    (ds,) = sources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://127.0.0.1:9090"
    # The dashboard's datasource variable lists datasources of this type.
    assert variables(load_dashboard())["datasource"]["query"] == ds["type"]
    # $__rate_interval and query steps assume the scrape interval of the example Prometheus config.
    prom = yaml.safe_load((ROOT / "config" / "prometheus" / "prometheus.yml").read_text())
    assert ds["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]

