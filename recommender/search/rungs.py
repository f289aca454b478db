"""Multi-fidelity promotion: the rung ladder and where rung results live.

Every candidate of a study is scored on the cheapest rung (the search fidelity). The best
fraction is promoted to the next rung and trained again there, against a baseline trained under
that rung's protocol (paired drop, apples to apples); the best fraction of those goes up again
(successive halving over fidelities). Who goes up, and what the answer is, the ledger decides
(:meth:`recommender.ledger.Ledger.promotion`, :meth:`~recommender.ledger.Ledger.answer`) from
what :func:`read_rungs` reads back.

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
from optuna.trial import TrialState

from ..errors import RecommenderError
from ..limits import check as limits_check, limit
from ..evaluation import Baseline
from ..ledger import RungInfo
from ..protocol import ProxyProtocol, get_protocol

__all__ = ["PromotionPolicy", "Rung", "LadderSpec", "parse_ladder", "ladder", "rung_study_name", "read_rungs",
           "MAX_RUNGS"]


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


#: The rungs ``--rungs auto`` may give each fidelity (the search rung included). ``smoke`` is a
#: dry run (a derived rung cost it 20x its search) and ``paper`` is the reference protocol itself;
#: ``proxy`` and ``confirm`` get one derived rung when it sees more of the data (see
#: :func:`sees_more`).
AUTO_RUNGS = {"smoke": 1, "proxy": 2, "confirm": 2, "paper": 1}

#: The most rungs a ladder may have, the search rung included (:mod:`recommender.limits`).
MAX_RUNGS = limit("rungs").high


@dataclass(frozen=True)
class LadderSpec:
    """The ladder the user asked for, parsed once (:func:`parse_ladder`).

    derived: rungs in all when they are derived from the search rung.
    names: fidelity names of the rungs above the search rung, when named.
    confirm: the older single re-check: a fidelity name (a second seed of the search's own
        fidelity when it is the search's), or ``none`` for no re-check.
    auto: ``--rungs auto``: up to :data:`AUTO_RUNGS` of the search fidelity, a derived rung only
        where it sees more of the data than the rung below.
    """

    derived: int = 2
    names: tuple[str, ...] = ()
    confirm: str | None = None
    auto: bool = False


def parse_ladder(rungs: str | int | LadderSpec | None = "auto", confirm_fidelity: str | None = None,
                 search_fidelity: str | None = None) -> LadderSpec:
    """``--rungs`` (``auto``, a count, or comma-separated fidelity names) and
    ``--confirm-fidelity`` (overrides it; ``search`` = the search's own fidelity) as a
    :class:`LadderSpec`; unknown fidelities and counts out of [1, :data:`MAX_RUNGS`] are a
    one-line error (the bound is :mod:`recommender.limits`' ``rungs``)."""
    if isinstance(rungs, LadderSpec):
        return rungs
    spec = _parse_rungs("auto" if rungs is None else str(rungs).strip(), search_fidelity)  # checked even when
    if confirm_fidelity is None:                                                          # overridden below
        return spec
    name = search_fidelity if confirm_fidelity == "search" else confirm_fidelity
    if name in ("none", ""):
        return LadderSpec(derived=1, confirm="none")
    get_protocol(name)
    return LadderSpec(confirm=name)


def _parse_rungs(text: str, search_fidelity: str | None) -> LadderSpec:
    if text in ("auto", ""):
        return LadderSpec(derived=AUTO_RUNGS.get(search_fidelity or "", 2), auto=True)
    if text.lstrip("-").isdigit():
        n = int(text)
        limits_check("rungs", n)
        return LadderSpec(derived=n)
    names = [r.strip() for r in text.split(",") if r.strip()]
    if names and search_fidelity is not None and names[0] == search_fidelity:
        names = names[1:]
    for name in names:
        get_protocol(name)  # an unknown fidelity is a one-line error
    limits_check("rungs", len(names) + 1, "--rungs (the search and the fidelities named)")
    return LadderSpec(derived=0, names=tuple(names))


def sees_more(lo: ProxyProtocol, hi: ProxyProtocol, native: int, n_train: int | None = None,
              n_val: int | None = None) -> bool:
    """Whether protocol ``hi`` sees more of the data than ``lo``: a larger input, or more
    training or validation images (``n_train``/``n_val``: what the data has; None: unknown,
    counted as more). Measured on digits, where ``proxy`` already uses every image at the native
    8 px: 3x the epochs with augmentation alone was not more faithful to long reference trainings
    (docs/measurements.md), so such a rung is not added by ``auto``."""
    if hi.input_resolution(native) > lo.input_resolution(native):
        return True

    def used(size: int, total: int | None) -> float:
        if total is None:
            return math.inf if not size else float(size)
        return float(min(size, total) if size else total)

    return used(hi.train_size, n_train) > used(lo.train_size, n_train) or used(hi.val_size, n_val) > used(
        lo.val_size, n_val)


def ladder(search: ProxyProtocol, native: int, rungs: str | int | LadderSpec | None = "auto",
           confirm_fidelity: str | None = None, policy: PromotionPolicy | None = None,
           pin_resolution: int = 0, n_train: int | None = None, n_val: int | None = None) -> list[Rung]:
    """The rungs of a study, lowest first.

    ``rungs``: a :class:`LadderSpec`, or what :func:`parse_ladder` reads: ``auto`` (the search
    rung and one derived rung), an integer count of derived rungs in all, or a list of fidelity
    names (``proxy,confirm``). ``confirm_fidelity`` (the older single re-check) overrides it:
    ``none`` = one rung; the search fidelity's own name = the same protocol with the next seed
    (a second-seed re-check); another fidelity = that protocol. ``pin_resolution`` (px, 0 =
    off): every rung runs at that input size (a given trained baseline is evaluated, and its
    weights inherited, at the size it was trained at). ``n_train``/``n_val``: the data's image
    counts, for ``auto`` (:func:`sees_more`).
    """
    spec = parse_ladder(rungs, confirm_fidelity, search.fidelity)
    out = _ladder(search, native, spec, policy or PromotionPolicy())
    if pin_resolution:
        out = [Rung(r.index, q, _label(q, native))
               for r in out for q in [r.protocol.replace(resolution=pin_resolution)]]
    if spec.auto:
        keep = [out[0]]
        for r in out[1:]:
            if not sees_more(keep[-1].protocol, r.protocol, native, n_train, n_val):
                break
            keep.append(r)
        out = keep
    return out


def auto_note(search: ProxyProtocol, rungs: list[Rung], spec: LadderSpec) -> str:
    """Why ``--rungs auto`` added no promotion rung (empty when it added one or was not auto)."""
    if not spec.auto or len(rungs) > 1:
        return ""
    if spec.derived <= 1:
        return (f"no promotion rung: --rungs auto does not promote at the {search.fidelity} fidelity "
                f"({'a dry run' if search.fidelity == 'smoke' else 'the reference protocol'}); "
                "--rungs 2 adds one")
    return (f"no promotion rung: {search.fidelity} already trains on all of this data at its full size, and "
            "more epochs alone were measured not to be more faithful (docs/measurements.md); --rungs 2 adds one")


def _ladder(search: ProxyProtocol, native: int, spec: LadderSpec, policy: PromotionPolicy) -> list[Rung]:
    out = [Rung(0, search, _label(search, native))]
    if spec.confirm is not None:
        if spec.confirm == "none":
            return out
        if spec.confirm == search.fidelity:
            p = search.replace(seed=search.seed + 1)
        else:
            p = get_protocol(spec.confirm, seed=search.seed + 1, threads=search.threads, device=search.device)
        return out + [Rung(1, p, _label(p, native))]
    if spec.names:
        for name in spec.names:
            p = get_protocol(name, seed=search.seed, threads=search.threads, device=search.device)
            out.append(Rung(len(out), p, _label(p, native)))
        return out
    p = search
    for k in range(1, spec.derived):
        p = derived(p, native, k, policy)
        out.append(Rung(k, p, _label(p, native)))
    return out


def rung_study_name(study_name: str, k: int) -> str:
    return study_name if k == 0 else f"{study_name}.rung{k}"


# -- reading rungs back --------------------------------------------------------------------------

def load_rung_study(storage: Any, study_name: str, k: int) -> optuna.Study | None:
    """Rung ``k``'s study, or None when promotions never reached it."""
    try:
        return optuna.load_study(study_name=rung_study_name(study_name, k), storage=storage)
    except KeyError:
        return None


def _baseline(attr: Any) -> Baseline | None:
    if attr is None:
        return None
    if not isinstance(attr, dict):  # written by hand or by another tool: not an answer to trust
        raise ValueError(f"a baseline stored as {type(attr).__name__}")
    return Baseline.from_dict(attr)


def _evaluation(attr: Any) -> dict[str, Any] | None:
    if attr is not None and not isinstance(attr, dict):
        raise ValueError(f"an evaluation stored as {type(attr).__name__}")
    return attr


def _rung0_label(attrs: dict[str, Any]) -> str:
    for r in attrs.get("rungs") or []:
        if isinstance(r, dict) and r.get("index") == 0 and r.get("label"):
            return str(r["label"])
    spec = attrs.get("spec") or {}
    return str(spec.get("fidelity", "search"))


Evidence = dict[int, tuple[dict[str, Any], "str | None", dict[int, dict[str, Any]]]]


def read_rungs(study: optuna.Study, max_rungs: int = MAX_RUNGS + 1) -> tuple[list[RungInfo], Evidence]:
    """Every rung of ``study`` (label, baseline, promotion decision) and every candidate's
    stored evaluations: ``{source trial: (recipe, preset, {rung: evaluation dict})}``.

    Rung 0: the study's completed trials that were evaluated (untrained ``constraint``-policy
    trials are not candidates). Rung k: the promoted candidates' trials in ``S.rung<k>`` that
    stored an evaluation (a trial whose worker died after its evaluation finished is evidence
    too); a candidate evaluated twice there (an interrupted run queued it again) keeps its last
    successful evaluation. Attributes of another shape than the search writes (a study changed
    by hand) are a ValueError.
    """
    from .recovery import SKIPPED_ATTR

    attrs = study.user_attrs
    rungs = [RungInfo(0, _rung0_label(attrs), _baseline(attrs.get("baseline")))]
    evidence: Evidence = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        ua = t.user_attrs
        ev = _evaluation(ua.get("evaluation"))
        if ev is None or "recipe" not in ua or ua.get(SKIPPED_ATTR) or t.values is None:
            continue
        evidence[t.number] = (ua["recipe"], ua.get("preset"), {0: ev})
    for k in range(1, max_rungs):
        st = load_rung_study(study._storage, study.study_name, k)
        if st is None:
            break
        ra = st.user_attrs
        promoted = ra.get("promoted")
        rungs.append(RungInfo(k, str(ra.get("label") or f"rung {k}"), _baseline(ra.get("baseline")),
                              tuple(int(n) for n in promoted) if isinstance(promoted, list) else None,
                              ra.get("skipped") or None, ra.get("protocol")))
        best: dict[int, dict[str, Any]] = {}
        for t in sorted(st.get_trials(deepcopy=False), key=lambda t: t.number):
            d, src = _evaluation(t.user_attrs.get("evaluation")), t.user_attrs.get("source_trial")
            if not isinstance(d, dict) or src is None or t.state not in (TrialState.COMPLETE, TrialState.FAIL):
                continue
            src = int(src)
            if src not in evidence:
                continue
            prev = best.get(src)
            if prev is None or d.get("ok", True) or not prev.get("ok", True):
                best[src] = d  # the last successful evaluation, else the last failed one
        for src, d in best.items():
            evidence[src][2][k] = d
    return rungs, evidence
