"""Pareto k-hat and effective sample size.

Tolerance for k-hat: the GPD shape fitted to M exceedances has an asymptotic standard error
of about (1 + k) / sqrt(M) (the maximum-likelihood value, which Zhang & Stephens nearly
attain; Zhang & Stephens 2009, Table 2), with M = ceil(min(0.2 n, 3 sqrt(n))) for PSIS.
Exceedances of an exact Pareto(alpha) over any threshold are exactly GPD with k = 1/alpha,
so there is no threshold bias. We accept 4 standard errors.
"""

import math

import numpy as np
import pytest

from tailmon.errors import InputError
from tailmon.estimators import effective_sample_size, khat_threshold, pareto_khat
from tailmon.estimators.diagnostics import KHAT_TIED_TAIL, tail_length


def khat_se(k, n):
    return (1 + k) / math.sqrt(tail_length(n))


def test_heavy_pareto_weights_have_high_khat():
    # w ~ Pareto(alpha = 1): k = 1. n = 1e5 gives M = 949 and SE = 0.065, so 0.7 is 4.6 SE below.
    n = 100_000
    w = np.random.default_rng(0).pareto(1.0, n) + 1.0
    k = pareto_khat(w)
    assert k > 0.7
    assert abs(k - 1.0) < 4 * khat_se(1.0, n)


def test_recovers_half():
    # w ~ Pareto(alpha = 2): k = 0.5, n = 1e5: SE = 0.049, tolerance 0.195; the PSIS prior
    # shrinks towards 0.5 and so adds no bias here.
    n = 100_000
    w = (np.random.default_rng(1).pareto(2.0, n) + 1.0) * 1e-30  # scale-free
    assert abs(pareto_khat(w) - 0.5) < 4 * khat_se(0.5, n)


@pytest.mark.parametrize("kind", ["uniform", "lognormal"])
def test_light_weights_have_low_khat(kind):
    # bounded (uniform: k = -1) and lognormal(sigma = 0.3) (k = 0 in the limit) weights, n = 1000,
    # M = 95: SE at k = 0 is 0.10, so 0.5 is 5 SE above the k = 0 case.
    rng = np.random.default_rng(2)
    w = rng.uniform(size=1000) if kind == "uniform" else np.exp(rng.normal(0, 0.3, 1000))
    assert pareto_khat(w) < 0.5


def test_scale_invariance():
    w = np.random.default_rng(3).pareto(1.5, 2000) + 1
    assert pareto_khat(w) == pytest.approx(pareto_khat(w * 1e200), abs=1e-9)


def test_degenerate_cases():
    assert pareto_khat(np.ones(9)) is None  # too few draws
    assert pareto_khat(np.ones(100)) == KHAT_TIED_TAIL  # constant: lightest possible tail
    assert pareto_khat(np.zeros(100)) == KHAT_TIED_TAIL
    # top of the weights tied on a plateau with a single weight standing out: no fit, and no
    # claim that the tail is light
    w = np.ones(100)
    w[0] = 1e6
    assert pareto_khat(w) is None
    # two atoms: five or more identical weights above the plateau
    w = np.ones(100)
    w[:10] = 5.0
    assert pareto_khat(w) == KHAT_TIED_TAIL


def test_effective_sample_size():
    assert effective_sample_size(np.ones(50)) == pytest.approx(50)
    assert effective_sample_size([1.0, 0.0, 0.0]) == pytest.approx(1)
    assert effective_sample_size(np.zeros(5)) == 0.0
    w = np.random.default_rng(4).exponential(size=100)
    assert effective_sample_size(w) == pytest.approx(w.sum() ** 2 / np.sum(w**2))
    assert effective_sample_size(w * 1e300) == pytest.approx(effective_sample_size(w))


def test_khat_threshold():
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(2 / 3)
    assert khat_threshold(10**6) == 0.7


@pytest.mark.parametrize("w", [[], [1.0, -1.0], [1.0, np.nan], [1.0, np.inf], [[1.0]]])
def test_bad_weights(w):
    with pytest.raises(InputError):
        pareto_khat(w)
    with pytest.raises(InputError):
        effective_sample_size(w)


def test_weights_tied_up_to_float_rounding_are_ties():
    """Catches: a plateau of one response's weight, computed twice in float32 (sampled by one
    component, teacher-forced under the other: 3.553503721 vs 3.553503449 in the demo's run),
    read as 22 exceedances of 1e-7 relative over the tail's threshold, which the GPD fit turned
    into k-hat 7.4 on weights bounded by 10 (the demo's prompts 3 and 5 flagged unreliable for
    it). The same weights with the plateau exactly tied must give the same k-hat."""
    rng = np.random.default_rng(5)
    n = 300  # M = 52
    body = rng.uniform(0.5, 3.0, n - 80)  # below the plateau
    top = rng.uniform(3.6, 7.4, 26)  # light, bounded top of the tail
    plateau = np.full(54, 3.553503449)
    exact = np.concatenate([body, top, plateau])
    noisy = exact.copy()
    noisy[-22:] = 3.553503721  # the drawing component's own float32 log-prob
    k_exact = pareto_khat(exact)
    assert k_exact is not None and k_exact < 0.5  # bounded uniform top: k well below 0.5
    assert pareto_khat(noisy) == pytest.approx(k_exact, abs=1e-12)
    # five or more weights tied up to rounding above the plateau are an atom, as exact ties are
    w = np.ones(100)
    w[:10] = 5.0 * (1 + 1e-7 * np.arange(10))
    assert pareto_khat(w) == KHAT_TIED_TAIL
    # a genuine spread just above the rounding tolerance is still a tail
    w = np.ones(100)
    w[:10] = 5.0 * np.exp(np.linspace(0, 0.5, 10))
    assert pareto_khat(w) not in (None, KHAT_TIED_TAIL)
