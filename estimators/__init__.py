"""tailmon.estimators: the statistics of DESIGN section 2 (numpy and scipy only).

Per prompt: `monte_carlo` (samples from the target) or `importance_sampling` (samples from a
defensive mixture of proposals, weights from `balance_log_weights`), each returning a frozen
`Estimate` with its interval, diagnostics and reliability flag. Over prompts: `aggregate`
returns an `Aggregate`; `extrapolate` turns it into deployment figures per window.
"""

from .aggregate import aggregate
from .diagnostics import effective_sample_size, khat_threshold, pareto_khat
from .extrapolate import (
    expected_per_window,
    extrapolate,
    p_any_per_window,
    parse_window,
    scale_volume,
    worst_query_forecast,
)
from .importance import balance_log_weights, importance_sampling
from .intervals import clopper_pearson_interval, wilson_interval
from .montecarlo import monte_carlo
from .result import Aggregate, Estimate

__all__ = [
    "Aggregate",
    "Estimate",
    "aggregate",
    "balance_log_weights",
    "clopper_pearson_interval",
    "effective_sample_size",
    "expected_per_window",
    "extrapolate",
    "importance_sampling",
    "khat_threshold",
    "monte_carlo",
    "p_any_per_window",
    "pareto_khat",
    "parse_window",
    "scale_volume",
    "wilson_interval",
    "worst_query_forecast",
]
