"""`tailmon alerts`: alert states, and test notifications through the configured sinks."""

from __future__ import annotations

import json
import os

import click

from tailmon.cli.errors import group
from tailmon.cli.options import config_option, open_store
from tailmon.errors import InputError, RuntimeFailure


@group()
def alerts():
    """Alert states, and test notifications through the configured sinks.

    Rules live in each monitor's `alerts:` list, sinks in the top-level `alert_sinks:` (see the
    README); the daemon evaluates them after every run and keeps their state in the database.
    """


@alerts.command("list")
@config_option
@click.option("--state", type=click.Choice(["firing", "pending", "resolved", "inactive"]), default=None,
              help="Only rules in this state.")
@click.option("--monitor", default=None, metavar="NAME", help="Only this monitor's rules.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="A table for people, or JSON for programs.")
def alerts_list(config_path, state, monitor, fmt):
    """Every alert rule's stored state (database from --config, else $TAILMON_DATABASE_URL), and
    the sinks that have not taken its last notification (JSON: `sinks`, each sink's last one).

    Example: tailmon alerts list --state firing
    """
    from tailmon.store import to_jsonable

    store = open_store(config_path)
    try:
        rows = [r for r in store.alert_states(state) if monitor is None or r["monitor"] == monitor]
        latest = store.latest_alert_notifications()
    finally:
        store.close()
    # Per sink, the last notification and whether that sink took it: `last_notified` is when the
    # rule last notified, not that anyone received it.
    sinks: dict[tuple, dict] = {}
    for n in latest:
        sinks.setdefault((n["monitor"], n["rule"]), {})[n["sink"]] = {
            "status": n["status"], "state": n["state"], "attempts": n["attempts"], "at": n["created_at"],
            "next_attempt_at": n["next_attempt_at"]}
    rows = [{**r, "sinks": sinks.get((r["monitor"], r["rule"]), {})} for r in rows]
    if fmt == "json":
        click.echo(json.dumps(to_jsonable(rows), indent=2, allow_nan=False))
        return
    if not rows:
        click.echo("no alerts" + (f" in state {state}" if state else ""))
        return
    click.echo(f"{'monitor':<20} {'rule':<24} {'state':<9} {'severity':<9} {'since':<25} {'value':>10}  last notified")
    for r in rows:
        value = "" if r.get("last_value") is None else f"{r['last_value']:.3g}"
        severity = (r.get("labels") or {}).get("severity", "")
        owed = [f"{name} ({n['status']}, {n['state']} after {n['attempts']} attempt(s))"
                for name, n in r["sinks"].items() if n["state"] in ("pending", "failed")]
        click.echo(f"{r['monitor']:<20} {r['rule']:<24} {r['state']:<9} {severity:<9} {str(r['since'] or '')[:25]:<25} "
                   f"{value:>10}  {r['last_notified'] or ''}" + (f"  not delivered: {', '.join(owed)}" if owed else ""))


@alerts.command("test")
@click.argument("rule", required=False)
@config_option
@click.option("--monitor", default=None, metavar="NAME", help="The monitor of RULE, when several have it.")
@click.option("--sink", default=None, metavar="NAME", help="Test this sink instead of a rule's sinks.")
def alerts_test(rule, config_path, monitor, sink):
    """Send a test notification: for RULE through its sinks, or to one --sink.

    Evaluates nothing and changes no alert state. The notification carries the label
    tailmon_test="true", so Alertmanager keeps it apart from the rule's real alert. Exit 0 when
    every sink took it, 3 when one did not (the sink and its answer are printed).

    \b
    Examples:
      tailmon alerts test harm-high --config tailmon.yaml
      tailmon alerts test --sink oncall --config tailmon.yaml
    """
    from tailmon.alerts import AlertService
    from tailmon.monitor.config import load_config

    if (rule is None) == (sink is None):
        raise InputError("give a RULE or --sink NAME (one of them)")
    if monitor and not rule:
        raise InputError("--monitor selects the monitor of RULE; --sink tests the sink alone")
    if not (config_path or os.environ.get("TAILMON_CONFIG")):
        raise InputError("alerts test needs the config (its rules and sinks): pass --config FILE or set TAILMON_CONFIG")
    cfg = load_config(config_path).config
    service = AlertService(cfg, store=None)
    if sink is not None:
        if sink not in service.sinks:
            raise InputError(f"no sink named {sink!r} (configured: {', '.join(service.sinks)})")
        notification, sinks = service.test_notification(), [sink]
    else:
        owners = [m.name for m in cfg.monitors if service.rule(m.name, rule) is not None and monitor in (None, m.name)]
        if not owners:
            where = f"monitor {monitor!r}" if monitor else "any monitor"
            raise InputError(f"no enabled alert rule named {rule!r} in {where}")
        if len(owners) > 1:
            raise InputError(f"rule {rule!r} is in monitors {', '.join(owners)}: pass --monitor NAME")
        found = service.rule(owners[0], rule)
        notification, sinks = service.test_notification(owners[0], found), service.sinks_of(found)
    results = service.send_now(notification, sinks)
    for name, delivery in results.items():
        answer = f" (HTTP {delivery.http_status})" if delivery.http_status else ""
        detail = "" if delivery.outcome == "delivered" else f": {delivery.error}"
        click.echo(f"{name}: {delivery.outcome}{answer} after {delivery.attempts} attempt(s){detail}")
    failed = [name for name, d in results.items() if d.outcome != "delivered"]
    if failed:
        raise RuntimeFailure(f"the test notification did not reach sink(s) {', '.join(failed)}")
