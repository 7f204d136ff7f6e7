"""Result dataclasses: one per-prompt `Estimate` and one over-prompts `Aggregate`.

Both are frozen and carry their diagnostics and a reliability flag with the reasons as
warnings; `to_dict()` gives the JSON form of DESIGN section 8 (plain numbers, lists,
non-finite floats as None).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _jsonable(value: Any) -> Any:
    """Convert a value to plain JSON types; nan and +-inf become None."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return _jsonable(float(value))
    return value


@dataclass(frozen=True)
class Estimate:
    """The estimated harm probability of one prompt, with its interval and diagnostics."""

    method: str
    """"mc" (Monte Carlo from the target) or "is" (importance sampling)."""
    n_samples: int
    p_hat: float
    """Point estimate: mean(h) for MC, the unbiased mean(w*h) for IS (may exceed 1 for wild weights)."""
    ci_low: float
    """Lower end of the two-sided interval at the requested `confidence` (95% by default), within
    [0, 1]: on its own a one-sided lower bound at level (1 + confidence) / 2 (97.5%)."""
    ci_high: float
    """Upper end of the two-sided interval at `confidence`, within [0, 1]: a one-sided upper bound
    at level (1 + confidence) / 2 (97.5% by default). For IS, two kinds: when `reliable`, the
    main interval's end (a stratified bootstrap-t of mean(w h), calibrated for skewed weights);
    when not (and with no harmful sample), `ci_high_conservative`, which holds whatever the
    weights' distribution. 1 when nothing bounds the estimate (unreliable, or no harmful sample,
    without a defensive share). No interval computed from drawn weights covers probability mass
    that was never drawn: the conservative bound limits how much that can be."""
    n_harmful: int
    """Samples with score h > 0."""
    h_sum: float
    """sum(h) over all samples."""
    n_hits_effective: float
    """The hit count the few-hits rule uses: sum(h) over the samples with w h > 0, the expected
    number of harmful samples if each were harmful with probability h (the count of harmful
    samples for 0/1 scores; for MC all weights are 1, so it equals h_sum). Below 5, the estimate
    is `upper_bound_only` and unreliable."""
    ess: float
    """(sum w)^2 / sum w^2; n for MC."""
    ess_wh: float
    """(sum w h)^2 / sum (w h)^2; 0 when no sample was harmful."""
    khat: float | None
    """Pareto k-hat of the weights w over all samples (None for MC or when too few weights to fit)."""
    khat_wh: float | None
    """Pareto k-hat of w h over the samples with w h > 0, the tail of what is averaged (None for
    MC, or with fewer than 21 such samples: too few for the tail fit). `reliable` needs the larger
    of `khat` and `khat_wh` at most min(0.7, 1 - 1/log10(n_samples))."""
    kl: float | None
    """-mean(log w) over samples possible under the target: an estimate of KL(q||p). None for MC."""
    max_weight_share: float | None
    self_normalised: float | None
    """sum(w h) / sum(w): biased for small n, a diagnostic only."""
    std_error: float
    upper_bound_only: bool
    """True when too few harmful samples were seen for p_hat to mean much: trust ci_high."""
    reliable: bool
    """The reliability rule held (the warnings say which part failed otherwise): then `ci_high`
    is the main interval's, else the conservative bound. Necessary, not sufficient: diagnostics
    computed from the drawn weights cannot see weights never drawn."""
    warnings: tuple[str, ...] = field(default_factory=tuple)
    ci_high_conservative: float = 1.0
    """The conservative upper bound, at the same one-sided level as `ci_high`, valid for any
    scores and weights: for IS with defensive share a0 > 0 every a0 w h lies in [0, 1], and this
    is Hoeffding's Chernoff bound on the mean of independent [0, 1] variables, divided by a0 (at
    least about log(2 / (1 - confidence)) / (a0 n), about 3.7 / (a0 n), whatever was seen: the
    price of covering mass the proposals may never draw); for MC the same bound on mean(h). 1
    when nothing bounds P without assumptions (IS with a0 = 0). It is `ci_high` for every
    unreliable IS estimate, and the gates' fallback."""
    log_w_spread: float | None = None
    """IS: the sd of log w over the harmful samples (each weighted by its score), the spread the
    main interval's spread allowance reads (None for MC, or with sum(h) <= 1 over the hits)."""
    defensive_share: float | None = None
    """The share a0 of the samples drawn from the target itself (IS; 1 for MC, whose every sample
    is the target's): every a0 w h lies in [0, 1], which is what a conservative bound over several
    prompts' samples together needs (`estimators.pooling`). None when unknown (reports stored
    before the field existed)."""

    def to_dict(self) -> dict:
        """JSON-ready dict: plain floats/ints/bools/lists, non-finite floats as None."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Aggregate:
    """Harm probability over a sample of prompts (P_query = E_x~D[P(x)]), with its interval."""

    n_prompts: int
    n_samples: int
    p_hat: float
    ci_low: float
    ci_high: float
    std_error: float
    n_harmful: int
    reliable: bool
    """True when every per-prompt estimate is reliable, there are at least 20 prompts and the
    fitted spread over prompts is at most 1.5 (the warnings say which failed)."""
    n_unreliable: int
    top_share: float | None = None
    """The largest prompt's share of the summed p_hat (None when every p_hat is 0). Above 0.5 one
    prompt carries most of the mean, and a warning says so."""
    log_spread: float | None = None
    """The fitted sd of ln P(x) over prompts (log-normal profile likelihood; None when fewer than 3
    prompts have enough hits to enter the fit). Above 1.5 the aggregate is flagged unreliable."""
    interval: str = "normal"
    """Which method set ci_high: "bootstrap-t" (over prompts), "log-normal" (profile likelihood of
    a log-normal spread over prompts), "bounds" (the unreliable prompts' conservative bounds) or
    "normal" (fewer than 10 prompts: mean +- z SE; one prompt: its own standard error)."""
    by_category: dict[str, "Aggregate"] = field(default_factory=dict)
    """One Aggregate per category (None -> "uncategorized"); empty when no categories were given."""
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """JSON-ready dict; `by_category` maps category names to nested dicts."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "by_category":
                out[f.name] = {str(k): v.to_dict() for k, v in value.items()}
            else:
                out[f.name] = _jsonable(value)
        return out
