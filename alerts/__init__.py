"""tailmon.alerts: alert rules, state and sinks (built by the alerts issue; empty for now)."""
