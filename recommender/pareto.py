"""Pareto dominance on (quality up, cost down): the one definition every part of the answer uses.

Promotion ranks candidates with :func:`ranks`, the ledger's front keeps the points that
:func:`nondominated` returns, and the knee of a front is :func:`knee`. A point is a
``(quality, cost)`` pair: quality is maximised (accuracy, or minus the drop), cost minimised
(params, MFLOPs, MB, ms).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["Point", "dominates", "nondominated", "ranks", "knee"]

Point = tuple[float, float]


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as good as ``b`` on both axes (quality up, cost down) and strictly
    better on one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def nondominated(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point dominates (equal points are all kept)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def ranks(points: Sequence[Point]) -> list[int]:
    """Non-dominated sorting: rank 0 is the Pareto front, rank 1 the front once rank 0 is
    removed, and so on."""
    out = [-1] * len(points)
    remaining = list(range(len(points)))
    r = 0
    while remaining:
        sub = [points[i] for i in remaining]
        front = {remaining[j] for j in nondominated(sub)}
        for i in front:
            out[i] = r
        remaining = [i for i in remaining if i not in front]
        r += 1
    return out


def knee(front: Sequence[Point]) -> int | None:
    """Index of the knee of a front: the point farthest *above* the chord joining the cheapest
    and the dearest point (both axes normalised to [0, 1]), i.e. the most quality for its cost
    relative to a straight trade-off. None when the front has fewer than three points, is flat
    on an axis, or no point lies above the chord (then no point is a better trade-off than the
    ends). A point below the chord is the worst trade-off, never the knee."""
    if len(front) < 3:
        return None
    order = sorted(range(len(front)), key=lambda i: (front[i][1], -front[i][0]))
    qs = [front[i][0] for i in order]
    cs = [front[i][1] for i in order]
    q0, q1, c0, c1 = min(qs), max(qs), min(cs), max(cs)
    if q1 == q0 or c1 == c0:
        return None
    pts = [((c - c0) / (c1 - c0), (q - q0) / (q1 - q0)) for c, q in zip(cs, qs)]
    (ax, ay), (bx, by) = pts[0], pts[-1]
    # signed distance (up to a positive factor): > 0 above the chord from the cheapest to the dearest
    above = [(bx - ax) * (py - ay) - (by - ay) * (px - ax) for px, py in pts]
    k = max(range(1, len(pts) - 1), key=lambda j: above[j])
    return order[k] if above[k] > 0 else None
