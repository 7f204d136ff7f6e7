"""tailmon.alerts: alert rules over each run's figures, their persisted state, and the sinks.

* `config`: the `alerts:` rules of a monitor and the top-level `alert_sinks:` (pydantic).
* `rules`: the state machine as pure functions of (figures, previous state, now).
* `sinks`: log, webhook (JSON or Slack, HMAC-signed) and Alertmanager; background delivery.
* `service`: `AlertService`, which the daemon calls after every run and on its clock, and
  `AlertStateStore`, the protocol through which it keeps state in the store.
"""

from tailmon.alerts.config import BUILTIN_UNRELIABLE, METRICS, AlertRuleConfig, SinkConfig
from tailmon.alerts.rules import Rule, State, Step, compile_rules, evaluate, run_figures
from tailmon.alerts.service import AlertService, AlertStateStore

__all__ = ["BUILTIN_UNRELIABLE", "METRICS", "AlertRuleConfig", "AlertService", "AlertStateStore", "Rule", "SinkConfig",
           "State", "Step", "compile_rules", "evaluate", "run_figures"]
