"""`sample_prompts`: who gets drawn, how often, in what memory.

Inclusion-frequency tests. Draw S times with seeds 0..S-1 and count how often each unit (a
record, or a distinct text under dedupe) is in the sample. Under a correct sampler each of the N
units is included with probability p = m/N, so a count is Binomial(S, p), and because every draw
has exactly m units the counts are negatively correlated: Cov(c_i, c_j) = -S p(1-p)/(N-1). The
covariance matrix is S p(1-p) N/(N-1) (I - 11'/N), so

    T = (N-1)/N * sum_i (c_i - S p)^2 / (S p (1-p))

is approximately chi-square with N-1 degrees of freedom (normal approximation; S p >= 160 here).
The tests assert its upper tail probability is above 1e-3. The seeds are fixed, so this either
always passes or always fails; 1e-3 is where a correct sampler has a 1-in-1000 chance of landing
on a failing seed set, while the biases the tests guard against (deterministic rounding, traffic
weights under dedupe) move single units by 10+ standard deviations and T by hundreds.
"""

from __future__ import annotations

import collections
import math
import weakref
from fractions import Fraction

import pytest
from scipy import stats

from tailmon.errors import RuntimeFailure
from tailmon.estimation.prompts import PromptItem
from tailmon.estimation.sources import NoPromptsError, PromptSource, allocate, sample_prompts


class ListSource(PromptSource):
    """Yields the same PromptItem objects on every pass, so a draw's items identify records."""

    def __init__(self, items):
        super().__init__()
        self.items = list(items)
        self.passes = 0

    def describe(self):
        return "test list"

    def records(self):
        self.passes += 1
        yield from self.items


def items(layout):
    """[(category, n)] -> n distinct records per category."""
    return [PromptItem(f"{category} prompt {i}", category) for category, n in layout for i in range(n)]


def chi_square_p(counts, draws, p):
    n = len(counts)
    t = (n - 1) / n * sum((c - draws * p) ** 2 for c in counts) / (draws * p * (1 - p))
    return stats.chi2.sf(t, n - 1)


def inclusion_counts(source, units, m, draws, unit=lambda item: id(item), **options):
    counts = collections.Counter()
    for seed in range(draws):
        drawn = sample_prompts(source, m, seed, **options)
        assert len(drawn) == m
        keys = [unit(item) for item in drawn]
        assert len(set(keys)) == m  # never the same record (or text) twice
        counts.update(keys)
    return [counts[unit(u)] for u in units]


@pytest.mark.parametrize(
    "layout, m, stratify",
    [
        ([(None, 20)], 5, True),                      # plain bottom-m
        ([("a", 12), ("b", 6), ("c", 2)], 5, True),   # quotas 3, 1.5, 0.5: random rounding
        ([(c, 4) for c in "abcde"], 2, True),         # quotas 0.4 each: largest remainder would starve 3 of 5
        ([("a", 12), ("b", 6), ("c", 2)], 5, False),
    ],
)
def test_every_record_has_inclusion_probability_m_over_n(layout, m, stratify):
    records = items(layout)
    draws = 1600  # S p >= 160 at p = 0.1; 1600 * 0.1 * 0.9 = 144 variance per count
    counts = inclusion_counts(ListSource(records), records, m, draws, stratify=stratify)
    p = m / len(records)
    assert chi_square_p(counts, draws, p) > 1e-3, counts
    # A single record off by 15% of its expectation is > 5 standard deviations here.
    sd = math.sqrt(draws * p * (1 - p))
    assert max(abs(c - draws * p) for c in counts) < 5 * sd, counts


def test_draws_are_traffic_weighted_without_dedupe():
    # One text served 10 times among 30 records: each of its copies is a record like any other,
    # so it is in the draw as often as a third of the stream is. Per-record uniformity is checked
    # above; here the aggregate: E[copies of "hot" drawn] = m * 10/30 = 2 of m = 6.
    records = [PromptItem("hot")] * 10 + items([(None, 20)])
    draws = 1000
    hot = sum(sum(item.text == "hot" for item in sample_prompts(ListSource(records), 6, seed)) for seed in range(draws))
    # Hypergeometric(30, 10, 6) per draw: variance 6 * (1/3)(2/3)(24/29) = 1.10; the mean over
    # 1000 draws has sd 0.033, so 2 +- 0.15 is > 4.5 sd.
    assert abs(hot / draws - 2) < 0.15


def test_dedupe_gives_each_distinct_text_equal_probability():
    # "a" is 10 records, "b" 5, eight more texts one each: 23 records, 10 distinct texts.
    texts = ["a"] * 10 + ["b"] * 5 + [f"t{i}" for i in range(8)]
    records = [PromptItem(t) for t in texts]
    distinct = list(dict.fromkeys(records))
    draws, m = 1600, 3
    counts = inclusion_counts(ListSource(records), distinct, m, draws, unit=lambda item: item.text, dedupe=True)
    p = m / len(distinct)
    assert chi_square_p(counts, draws, p) > 1e-3, counts
    # Traffic-weighted, "a" would be in ~80% of draws (1 - C(13,3)/C(23,3)), not 30%.
    assert abs(counts[0] / draws - 0.3) < 0.06


def test_stratified_counts_are_the_proportional_quotas():
    records = items([("a", 60), ("b", 30), ("c", 10)])
    for seed in range(50):
        drawn = sample_prompts(ListSource(records), 10, seed)
        assert collections.Counter(item.category for item in drawn) == {"a": 6, "b": 3, "c": 1}
    # Quotas 4.2, 2.1, 0.7 with m = 7: floor or ceil, and the extra draw goes to c with
    # probability 0.7 (Bernoulli; over 1000 seeds sd 0.0145, so +-0.06 is > 4 sd).
    c_got_one = 0
    for seed in range(1000):
        counts = collections.Counter(item.category for item in sample_prompts(ListSource(records), 7, seed))
        assert counts["a"] in (4, 5) and counts["b"] in (2, 3) and counts["c"] in (0, 1) and counts.total() == 7
        c_got_one += counts["c"]
    assert abs(c_got_one / 1000 - 0.7) < 0.06


def test_records_without_category_are_a_stratum_of_their_own():
    records = items([(None, 50), ("x", 50)])
    for seed in range(20):
        drawn = sample_prompts(ListSource(records), 4, seed)
        assert collections.Counter(item.category for item in drawn) == {None: 2, "x": 2}


def test_dedupe_with_strata_allocates_by_distinct_texts_not_traffic():
    # "busy": 4 distinct texts served 25 times each (100 records); "varied": 40 texts once each.
    # Distinct shares give busy 10 * 4/44 = 0.91 of m = 10; traffic shares would give 7.1.
    # The varied stratum's count comes from the KMV estimate 10 / U_(11) (U_(11) ~ Beta(11, 30),
    # relative sd ~ 1/3), so busy's quota 40 / (4 + estimate) ranges over about 0.6 .. 1.6 with a
    # mean near 0.95 (Jensen pulls it above 0.91). Over 400 seeds the mean count has sd ~0.03;
    # 0.95 +- 0.3 allows for the estimator's bias and is 20 draws away from traffic weights.
    records = [PromptItem(f"busy {i}", "busy") for i in range(4)] * 25 + items([("varied", 40)])
    total = 0
    for seed in range(400):
        drawn = sample_prompts(ListSource(records), 10, seed, dedupe=True)
        assert len(drawn) == 10 and len({(i.category, i.text) for i in drawn}) == 10
        busy = sum(item.category == "busy" for item in drawn)
        assert busy <= 3
        total += busy
    assert abs(total / 400 - 0.95) < 0.3


def test_bounded_memory_over_a_million_record_generator():
    # Each record is a fresh object tracked by a WeakSet: the number alive at any moment is what
    # the sampler holds. It may keep m per category in its heaps plus three in flight: the record
    # in hand, and the one before it, still bound to the sampler's loop variable and to the result
    # tuple that zip keeps for reuse. A sampler that listed the stream would hold up to 10^6.
    m, categories, n = 20, 4, 1_000_000

    class Generated(PromptSource):
        max_alive = 0

        def describe(self):
            return "generated"

        def records(self):
            alive = weakref.WeakSet()
            for i in range(n):
                item = PromptItem(f"prompt {i}", "abcd"[i % categories])
                alive.add(item)
                if len(alive) > self.max_alive:
                    self.max_alive = len(alive)
                yield item

    source = Generated()
    drawn = sample_prompts(source, m, seed=1)
    assert collections.Counter(item.category for item in drawn) == {c: 5 for c in "abcd"}
    assert source.max_alive <= m * categories + 3, source.max_alive


def test_deterministic_per_seed_and_different_across_seeds():
    records = items([("a", 300), ("b", 200)])
    source = ListSource(records)
    first = sample_prompts(source, 10, seed=7)
    assert sample_prompts(source, 10, seed=7) == first
    assert sample_prompts(source, 10, seed=8) != first
    # Stream order, one pass per draw.
    positions = [records.index(item) for item in first]
    assert positions == sorted(positions)
    assert source.passes == 3
    # Dedupe draws are deterministic too.
    assert sample_prompts(source, 10, seed=3, dedupe=True) == sample_prompts(source, 10, seed=3, dedupe=True)


def test_fewer_eligible_records_than_m_gives_them_all():
    records = items([("a", 3), ("b", 2)])
    assert sample_prompts(ListSource(records), 10, seed=0) == records
    assert sample_prompts(ListSource(records + records), 10, seed=0, dedupe=True) == records
    assert sample_prompts(ListSource(records + records), 10, seed=0, dedupe=True, stratify=False) == records


def test_length_filters_count_characters_of_the_text_as_served():
    records = [PromptItem("ab"), PromptItem("  abc  "), PromptItem("ééé"), PromptItem("x" * 20)]
    drawn = sample_prompts(ListSource(records), 10, seed=0, min_chars=3, max_chars=7)
    assert drawn == [PromptItem("  abc  "), PromptItem("ééé")]


def test_no_eligible_record_names_the_source_and_filters():
    with pytest.raises(NoPromptsError) as error:
        sample_prompts(ListSource([PromptItem("short")]), 5, seed=0, min_chars=10)
    message = str(error.value)
    assert "test list" in message and "min_chars=10" in message and "1 record(s) read" in message
    assert isinstance(error.value, RuntimeFailure)
    with pytest.raises(NoPromptsError, match="0 record"):
        sample_prompts(ListSource([]), 5, seed=0)


def test_m_must_be_positive():
    with pytest.raises(ValueError, match="m must be at least 1"):
        sample_prompts(ListSource(items([(None, 3)])), 0, seed=0)


def test_allocate_caps_strata_at_what_they_hold():
    # Estimated sizes can promise a stratum more than its heap holds: the surplus moves on.
    counts = allocate(6, {"a": Fraction(90), "b": Fraction(10)}, {"a": 4, "b": 7}, Fraction(1, 2))
    assert counts == {"a": 4, "b": 2}
    counts = allocate(5, {"a": Fraction(1), "b": Fraction(1), "c": Fraction(2)}, {"a": 5, "b": 5, "c": 5}, Fraction(0))
    assert sum(counts.values()) == 5 and counts["c"] in (2, 3)
