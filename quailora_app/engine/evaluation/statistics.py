"""The statistics of downstream accuracy: the Wilson interval of one model's accuracy, and the paired comparison of
two models on the same items (McNemar's exact test on the items only one of them gets right)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Protocol

from quailora_app.errors import ConfigError


class Scored(Protocol):
    """Anything with per-item correctness (accuracy.TaskScore)."""

    correct: tuple[bool, ...]



def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion hits / n:
    (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n). (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= hits <= n:
        raise ValueError(f"hits must be in [0, n], got {hits} of {n}")
    z = _z(confidence)
    p = hits / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar(only_a: int, only_b: int) -> tuple[float, float]:
    """McNemar's exact test on the discordant pairs: under "the two are equally accurate" each discordant item
    is a fair coin, so with m = only_a + only_b and x = min(only_a, only_b),
    p = min(1, 2 P(X <= x)), X ~ Binomial(m, 1/2). Returns (exact p, mid-p = p - P(X = x)); (1, 1) when m = 0."""
    m, x = only_a + only_b, min(only_a, only_b)
    if m == 0:
        return 1.0, 1.0
    tail = sum(math.comb(m, i) for i in range(x + 1))
    exact = min(1.0, 2 * tail / 2**m)  # Python integers: exact at any m
    mid = min(1.0, (2 * tail - math.comb(m, x)) / 2**m)
    return exact, mid


@dataclass(frozen=True)
class PairedTest:
    """Two models on the same items: a right / b right counts, the accuracy difference a - b with its interval,
    and McNemar's exact p-value (small p: the difference is not chance)."""

    n: int
    both: int
    only_a: int
    only_b: int
    neither: int
    difference: float  # accuracy of a minus accuracy of b
    interval: tuple[float, float]  # Wald interval of the paired difference
    p_value: float  # McNemar exact, two-sided
    mid_p: float
    confidence: float = 0.95

    def summary(self, a: str = "a", b: str = "b") -> str:
        """One line: 'nf4 vs full: -1.4 points (95% CI -2.3 to -0.5); 28 items only nf4 got right, 61 only full;
        McNemar exact p = 0.0006'."""
        lo, hi = self.interval
        verdict = "a real difference" if self.p_value < 1 - self.confidence else "within the noise"
        return (f"{a} vs {b}: {100 * self.difference:+.1f} points ({100 * self.confidence:.0f}% CI "
                f"{100 * lo:+.1f} to {100 * hi:+.1f}) on {self.n:,} items; {self.only_a} right only for {a}, "
                f"{self.only_b} only for {b}; McNemar exact p = {self.p_value:.2g} ({verdict})")

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "both": self.both, "only_a": self.only_a, "only_b": self.only_b,
                "neither": self.neither, "difference": self.difference, "interval": list(self.interval),
                "p_value": self.p_value, "mid_p": self.mid_p, "confidence": self.confidence}


def paired_test(a: Scored | Sequence[bool], b: Scored | Sequence[bool],
                confidence: float = 0.95) -> PairedTest:
    """Compare two models' per-item correctness on the same items (TaskScores of the same task, or lists).
    Interval of the difference d = (only_a - only_b) / n: d -+ z sqrt(only_a + only_b - n d^2) / n."""
    ca = tuple(getattr(a, "correct", a))
    cb = tuple(getattr(b, "correct", b))
    if len(ca) != len(cb) or not ca:
        raise ValueError(f"a paired test needs the same non-empty items on both sides, got {len(ca)} and {len(cb)}")
    n = len(ca)
    both = sum(1 for x, y in zip(ca, cb, strict=True) if x and y)
    only_a = sum(1 for x, y in zip(ca, cb, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(ca, cb, strict=True) if y and not x)
    d = (only_a - only_b) / n
    half = _z(confidence) * math.sqrt(max(only_a + only_b - n * d * d, 0.0)) / n
    exact, mid = mcnemar(only_a, only_b)
    return PairedTest(n, both, only_a, only_b, n - both - only_a - only_b, d, (d - half, d + half), exact, mid,
                      confidence)
