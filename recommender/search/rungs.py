"""Multi-fidelity promotion: the rung ladder, who is promoted, and where rung results live.

Every candidate of a study is scored on the cheapest rung (the search fidelity). The best
fraction, by Pareto rank under the constraints, is promoted to the next rung and trained again
there, against a baseline trained under that rung's protocol (paired drop, apples to apples);
the best fraction of those goes up again (successive halving over fidelities). The
recommendation is chosen at the highest rung reached.

Storage: rung k >= 1 of study ``S`` is the Optuna study ``S.rung<k>`` in the same storage. Its
user attrs hold the rung's protocol, its baseline and the promoted source trials (decided once,
under the study lock); every promoted candidate is an enqueued trial whose user attrs name its
source trial and recipe and, once evaluated, hold its evaluation. Workers of a fleet (or of
``--jobs``) pop the enqueued trials, so a resumed or shared study continues promotions where it
stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..constraints import Budget, MaxDrop
from ..errors import RecommenderError
from ..evaluation import Evaluation
from ..protocol import ProxyProtocol, get_protocol

__all__ = ["PromotionPolicy", "Rung", "ladder", "rung_study_name", "select_for_promotion", "pareto_ranks",
           "rung_results", "RungResult"]


@dataclass(frozen=True)
class PromotionPolicy:
    """How many candidates go up a rung and how much dearer each rung is.

    fraction: share of the eligible candidates promoted (successive halving's 1/eta).
    min_promoted, max_promoted: bounds on the number promoted per rung.
    epoch_factor: epochs of rung k+1 = epochs of rung k x this.
    max_resolution: cap (px) on the input side that rungs grow towards (the native size).
    """

    fraction: float = 1 / 3
    min_promoted: int = 2
    max_promoted: int = 6
    epoch_factor: float = 3.0
    max_resolution: int = 32

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise RecommenderError(f"promotion fraction must be in (0, 1], got {self.fraction}")
        if self.min_promoted < 1 or self.max_promoted < self.min_promoted:
            raise RecommenderError("promotion bounds need 1 <= min_promoted <= max_promoted")
        if self.epoch_factor < 1:
            raise RecommenderError("epoch_factor must be >= 1")

    def count(self, eligible: int) -> int:
        """How many of ``eligible`` candidates to promote."""
        if eligible <= 0:
            return 0
        k = math.ceil(eligible * self.fraction)
        return min(eligible, max(self.min_promoted, min(self.max_promoted, k)))


@dataclass(frozen=True)
class Rung:
    """A fidelity of the ladder: index 0 is the search's own protocol."""

    index: int
    protocol: ProxyProtocol
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "protocol": self.protocol.to_dict()}


def _label(p: ProxyProtocol, native: int) -> str:
    res = p.input_resolution(native)
    return (f"{p.fidelity} ({res} px, {p.epochs} ep{', aug' if p.augment else ''}"
            f"{', seed ' + str(p.seed) if p.seed else ''})")


def derived(p: ProxyProtocol, native: int, k: int, policy: PromotionPolicy) -> ProxyProtocol:
    """Rung ``k``'s protocol derived from rung ``k-1``'s: ``epoch_factor`` x the epochs, twice the
    input side up to the native size (capped at ``policy.max_resolution``), augmentation on,
    twice the training images, every validation image."""
    res = p.input_resolution(native)
    cap = max(res, min(native, policy.max_resolution))
    return p.replace(fidelity=f"{p.fidelity.split('+')[0]}+r{k}", epochs=max(p.epochs + 1,
                     int(round(p.epochs * policy.epoch_factor))), resolution=min(cap, 2 * res),
                     augment=True, train_size=0 if not p.train_size else 2 * p.train_size, val_size=0)


def ladder(search: ProxyProtocol, native: int, rungs: str | int | list[str] | None = "auto",
           confirm_fidelity: str | None = None, policy: PromotionPolicy | None = None,
           pin_resolution: int = 0) -> list[Rung]:
    """The rungs of a study, lowest first.

    ``rungs``: ``auto`` (the search rung and one derived rung), an integer count of derived rungs
    in all, or a list of fidelity names (``proxy,confirm``). ``confirm_fidelity`` (the older
    single re-check) overrides it: ``none`` = one rung; the search fidelity's own name = the same
    protocol with the next seed (a second-seed re-check); another fidelity = that protocol.
    ``pin_resolution`` (px, 0 = off): every rung runs at that input size (a given trained
    baseline is evaluated, and its weights inherited, at the size it was trained at).
    """
    out = _ladder(search, native, rungs, confirm_fidelity, policy or PromotionPolicy())
    if pin_resolution:
        out = [Rung(r.index, q, _label(q, native))
               for r in out for q in [r.protocol.replace(resolution=pin_resolution)]]
    return out


def _ladder(search: ProxyProtocol, native: int, rungs: str | int | list[str] | None,
            confirm_fidelity: str | None, policy: PromotionPolicy) -> list[Rung]:
    out = [Rung(0, search, _label(search, native))]
    if confirm_fidelity is not None:
        if confirm_fidelity in ("none", ""):
            return out
        if confirm_fidelity == search.fidelity:
            p = search.replace(seed=search.seed + 1)
        else:
            p = get_protocol(confirm_fidelity, seed=search.seed + 1, threads=search.threads,
                             device=search.device)
        return out + [Rung(1, p, _label(p, native))]
    if isinstance(rungs, str) and rungs not in ("auto", "") and not rungs.isdigit():
        names = [r.strip() for r in rungs.split(",") if r.strip()]
        if names and names[0] == search.fidelity:
            names = names[1:]
        for name in names:
            p = get_protocol(name, seed=search.seed, threads=search.threads, device=search.device)
            out.append(Rung(len(out), p, _label(p, native)))
        return out
    count = 2 if rungs in (None, "auto", "") else int(rungs)
    if count < 1:
        raise RecommenderError(f"--rungs must be at least 1, got {count}")
    p = search
    for k in range(1, count):
        p = derived(p, native, k, policy)
        out.append(Rung(k, p, _label(p, native)))
    return out


def rung_study_name(study_name: str, k: int) -> str:
    return study_name if k == 0 else f"{study_name}.rung{k}"


# -- promotion ---------------------------------------------------------------------------------

@dataclass
class Candidate:
    """A candidate at a rung: its source trial, recipe and evaluation there."""

    trial: int
    recipe: dict[str, Any]
    evaluation: Evaluation
    params: dict[str, Any]


def pareto_ranks(points: list[tuple[float, float]]) -> list[int]:
    """Non-dominated sorting of (accuracy up, cost down): rank 0 is the Pareto front."""
    n = len(points)
    ranks = [-1] * n
    remaining = set(range(n))
    r = 0
    while remaining:
        front = [i for i in remaining if not any(
            points[j][0] >= points[i][0] and points[j][1] <= points[i][1]
            and (points[j][0] > points[i][0] or points[j][1] < points[i][1]) for j in remaining)]
        for i in front:
            ranks[i] = r
        remaining -= set(front)
        r += 1
    return ranks


def eligible(c: Candidate, max_drop: MaxDrop, budgets: list[Budget], baseline_acc: float) -> bool:
    """Worth training again: it ran, every budget holds (costs do not change with the fidelity),
    and its drop's interval reaches into the tolerance."""
    e = c.evaluation
    if not e.ok or e.accuracy is None:
        return False
    if any(b.violation(e.costs) > 0 for b in budgets):
        return False
    low = e.drop_low_pp if e.drop_low_pp is not None else e.drop_pp
    return low is None or low <= max_drop.allowed_pp(baseline_acc)


def select_for_promotion(cands: list[Candidate], max_drop: MaxDrop, budgets: list[Budget],
                         baseline_acc: float, policy: PromotionPolicy, limit: int | None = None
                         ) -> list[Candidate]:
    """The best ``policy.fraction`` of the eligible candidates by Pareto rank on (accuracy,
    primary cost), cheaper first within a rank; at most ``limit`` (what the time budget allows)."""
    pool = [c for c in cands if eligible(c, max_drop, budgets, baseline_acc)]
    primary = budgets[0]
    pts = [(c.evaluation.accuracy or 0.0, primary.value(c.evaluation.costs)) for c in pool]
    ranks = pareto_ranks(pts)
    order = sorted(range(len(pool)), key=lambda i: (ranks[i], pts[i][1], -pts[i][0], pool[i].trial))
    k = policy.count(len(pool))
    if limit is not None:
        k = min(k, max(0, limit))
    return [pool[i] for i in order[:k]]


# -- reading results back ----------------------------------------------------------------------

@dataclass
class RungResult:
    """One candidate's evaluation at one rung (index >= 1), read back from a rung study."""

    rung: int
    label: str
    evaluation: Evaluation


def load_rung_study(storage: Any, study_name: str, k: int) -> optuna.Study | None:
    """Rung ``k``'s study, or None when promotions never reached it."""
    try:
        return optuna.load_study(study_name=rung_study_name(study_name, k), storage=storage)
    except KeyError:
        return None


def rung_results(storage: Any, study_name: str, max_rungs: int = 16
                 ) -> tuple[list[dict[str, Any]], dict[int, list[RungResult]]]:
    """Every rung's attributes (index >= 1: label, protocol, baseline) and, per source trial,
    its evaluations at rungs >= 1 (lowest first)."""
    infos: list[dict[str, Any]] = []
    per_trial: dict[int, list[RungResult]] = {}
    for k in range(1, max_rungs):
        st = load_rung_study(storage, study_name, k)
        if st is None:
            break
        attrs = st.user_attrs
        infos.append({"index": k, **{a: attrs.get(a) for a in ("label", "protocol", "baseline", "promoted",
                                                               "skipped")}})
        for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            d = t.user_attrs.get("evaluation")
            src = t.user_attrs.get("source_trial")
            if d is None or src is None:
                continue
            per_trial.setdefault(int(src), []).append(RungResult(k, attrs.get("label", f"rung {k}"),
                                                                 Evaluation.from_dict(d)))
    return infos, per_trial


def candidates_from(trials: list[FrozenTrial]) -> list[Candidate]:
    """Rung-0 candidates from the main study's completed trials."""
    out = []
    for t in trials:
        d = t.user_attrs.get("evaluation")
        if d is None or t.state != TrialState.COMPLETE or "recipe" not in t.user_attrs:
            continue
        out.append(Candidate(t.number, t.user_attrs["recipe"], Evaluation.from_dict(d), dict(t.params)))
    return out
