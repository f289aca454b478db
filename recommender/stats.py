"""Statistics of accuracy comparisons: intervals, the paired drop, and the test's power.

- :func:`wilson_interval`: 95 % interval of an accuracy (a binomial proportion).
- :func:`paired_drop`: a candidate's drop against the baseline on the same validation images,
  with a paired bootstrap interval.
- :func:`min_resolvable_drop`: the smallest drop the paired comparison can tell from zero on
  ``n`` validation images, before any candidate is trained (honest power: when it exceeds the
  tolerance, the data cannot resolve the tolerance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DropEstimate", "wilson_interval", "paired_drop", "min_resolvable_drop", "Z95"]

#: two-sided 95 % normal quantile
Z95 = 1.959963984540054


@dataclass
class DropEstimate:
    """Accuracy drop of a candidate against the baseline on the same images, in percentage
    points (positive = worse). ``ci_low_pp``..``ci_high_pp`` is a 95% paired-bootstrap interval;
    ``samples_pp`` holds the bootstrap replicates."""

    drop_pp: float
    ci_low_pp: float
    ci_high_pp: float
    n: int
    samples_pp: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def prob_within(self, max_drop_pp: float) -> float:
        """Bootstrap probability that the true drop is <= ``max_drop_pp``."""
        if self.samples_pp.size == 0:
            return float(self.drop_pp <= max_drop_pp)
        return float(np.mean(self.samples_pp <= max_drop_pp + 1e-12))

    def to_dict(self) -> dict:
        return {"drop_pp": self.drop_pp, "ci_low_pp": self.ci_low_pp,
                "ci_high_pp": self.ci_high_pp, "n": self.n}


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k <= 0 else max(0.0, centre - half)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return lo, hi


def paired_drop(base_correct: np.ndarray, cand_correct: np.ndarray, *, n_boot: int = 2000,
                seed: int = 0) -> DropEstimate:
    """Drop (pp) = baseline accuracy - candidate accuracy on the same images, with a 95% paired
    bootstrap interval (images resampled with replacement, both models together).

    Only the per-image difference (-1, 0, +1) matters, so a resample is a multinomial draw of the
    three counts: exact and O(n_boot) whatever the number of images.
    """
    b = np.asarray(base_correct, dtype=bool)
    c = np.asarray(cand_correct, dtype=bool)
    if b.shape != c.shape or b.ndim != 1:
        raise ValueError(f"paired_drop needs two equal-length vectors, got {b.shape} and {c.shape}")
    n = b.size
    if n == 0:
        return DropEstimate(0.0, -100.0, 100.0, 0)
    diff = b.astype(np.int8) - c.astype(np.int8)  # +1: only the baseline was right
    counts = np.array([(diff == 1).sum(), (diff == 0).sum(), (diff == -1).sum()], dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=n_boot)
    samples = (draws[:, 0] - draws[:, 2]) * (100.0 / n)
    drop = float(diff.mean() * 100.0)
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return DropEstimate(drop_pp=drop, ci_low_pp=float(lo), ci_high_pp=float(hi), n=n,
                        samples_pp=samples)




def min_resolvable_drop(n: int, baseline_accuracy: float, discordance: float | None = None,
                        z: float = Z95) -> float:
    """Half-width (percentage points) of the 95 % interval of a paired drop on ``n`` validation
    images: the smallest drop the comparison can tell from zero.

    The drop is (b - c) / n, where b and c count the images only the baseline, or only the
    candidate, gets right; for a candidate as accurate as the baseline its standard error is
    sqrt(q / n) with q the discordance rate (b + c) / n. Before any candidate is measured, q is
    taken as 2 e (1 - e) for the baseline's error rate e (errors independent of the baseline's:
    candidates that make the same mistakes resolve finer); ``discordance`` overrides it with a
    measured rate. Returns inf for ``n`` = 0.
    """
    if n <= 0:
        return math.inf
    e = min(max(1.0 - float(baseline_accuracy), 0.0), 1.0)
    q = 2.0 * e * (1.0 - e) if discordance is None else float(discordance)
    q = max(q, 1.0 / n)  # at least one discordant image
    return 100.0 * z * math.sqrt(q / n)
