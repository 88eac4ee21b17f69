"""Robust statistics: the baseline an account's own history gives, not a fixed threshold.

Mail volumes are heavy-tailed and bursty, so the mean and standard deviation of an
account's history are dragged by the very spikes we look for.  The median and the
median absolute deviation (MAD) are not: half the history may be odd before they move.

    Baseline.of([3, 0, 5, 4, 2, ...])    the counts of the account's previous windows
    baseline.median, .mad, .peak         peak: the largest earlier window
    baseline.sigma                       1.4826 * MAD (the normal-consistent scale), never
                                         below sqrt(median) nor 1: counts are at least as
                                         noisy as a Poisson process, and a history of
                                         identical counts (MAD 0) must not make every
                                         small change infinitely surprising
    baseline.z(x)                        (x - median) / sigma
    baseline.upper(k)                    the highest count still ordinary: the larger of
                                         median + k * sigma and the earlier peak, so an
                                         account that has done this before (a newsletter
                                         every Monday) is measured against that
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MAD_TO_SIGMA = 1.4826


def median(values: Sequence[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2.0


def mad(values: Sequence[float]) -> float:
    """Median absolute deviation from the median."""
    centre = median(values)
    return median([abs(v - centre) for v in values])


@dataclass(frozen=True)
class Baseline:
    windows: int
    median: float
    mad: float
    peak: float

    @staticmethod
    def of(values: Sequence[float]) -> Baseline:
        return Baseline(len(values), median(values), mad(values),
                        float(max(values)) if values else 0.0)

    @property
    def sigma(self) -> float:
        return max(MAD_TO_SIGMA * self.mad, math.sqrt(max(self.median, 0.0)), 1.0)

    def z(self, value: float) -> float:
        return (value - self.median) / self.sigma

    def upper(self, k: float) -> float:
        return max(self.median + k * self.sigma, self.peak)


def zero_filled(nonzero: dict[int, float], windows: int) -> list[float]:
    """Counts of windows 1..windows from the non-zero ones (window index -> count)."""
    return [float(nonzero.get(index, 0.0)) for index in range(1, windows + 1)]


def severity(observed: float, bound: float, floor: float = 1.0) -> float:
    """How far past its bound a value is: 0 at the bound (or under it: never
    negative), 1 at twice the bound, +1 per doubling.  The bound counts as at least
    `floor`: 1 for counts (an account with no history is not "infinitely" past it);
    ratios (0..1) pass a small floor, or every ratio would look under its bound."""
    return max(0.0, math.log2(max(observed, 1e-9) / max(bound, floor)))
