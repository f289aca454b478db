"""The ledger of evidence: every measurement of every candidate, per rung, with that rung's baseline.

One model of what the study found, read by everything that decides or shows the answer:
promotion (:meth:`Ledger.promotion`), the recommendation rule, the front, the knee and the
alternatives (:meth:`Ledger.answer`), the terminal, ``report.md``, ``report.json``, the plot,
``rec.pareto``, the dashboard note and the exit code.

- A :class:`Measurement` is one evaluation of a candidate at one rung, with the baseline of that
  rung and the :class:`~recommender.feasibility.Verdict` of the question's one feasibility
  predicate on it.
- An :class:`Entry` is a candidate with its measurements, lowest rung first. Its *deciding*
  measurement, the answer-facing estimate, is its highest-fidelity successful one: a candidate
  *held* when it met every constraint there, and was *refuted* when it did not.
- The :class:`Answer`: the study never ends "nothing feasible" while some candidate held at the
  highest rung it was measured on. Among the candidates that held, the answer comes from the
  highest rung at which any held (the best evidence), and is the cheapest on the primary budget
  there (the more accurate of equally cheap ones). When every candidate measured above that rung
  was refuted there, the answer falls back to this lower-rung evidence and says so.
- Pareto dominance (:mod:`recommender.pareto`) is on (minus the drop, primary cost): within one
  rung the drop orders candidates exactly as accuracy does (one baseline), and across rungs the
  drop, measured against each rung's own baseline, is the comparable quantity. On the front, a
  candidate is dominated only by one measured at the same or a higher rung.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Mapping, Sequence

from .evaluation import Baseline, Evaluation
from .feasibility import Power, Verdict, chance_level
from .pareto import dominates, knee, ranks
from .question import Question
from .recipe import Recipe

__all__ = ["RungInfo", "Measurement", "Entry", "Answer", "Ledger"]


@dataclass(frozen=True)
class RungInfo:
    """One rung of the study: its label, baseline, and promotion decision.

    promoted: source trials promoted to it (None: not decided yet; rung 0: None).
    skipped: why it did not run (None: it ran or was not reached).
    protocol: the rung's protocol as a dict (None: unknown).
    """

    index: int
    label: str
    baseline: Baseline | None = None
    promoted: tuple[int, ...] | None = None
    skipped: str | None = None
    protocol: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Measurement:
    """A candidate's evaluation at one rung, judged against that rung's baseline."""

    rung: int
    label: str
    evaluation: Evaluation
    baseline: Baseline | None
    verdict: Verdict

    @property
    def ok(self) -> bool:
        return bool(self.evaluation.ok) and self.evaluation.accuracy is not None

    @property
    def accuracy(self) -> float | None:
        return self.evaluation.accuracy

    @property
    def drop(self) -> float | None:
        return self.evaluation.drop_pp

    @property
    def quality(self) -> float:
        """What the front maximises: minus the drop (pp) against this rung's baseline."""
        d = self.evaluation.drop_pp
        return -d if d is not None else -math.inf

    @property
    def half_width(self) -> float | None:
        e = self.evaluation
        if e.drop_low_pp is None or e.drop_high_pp is None:
            return None
        return (e.drop_high_pp - e.drop_low_pp) / 2


@dataclass(frozen=True)
class Entry:
    """A candidate: its source trial, recipe, preset and measurements (lowest rung first)."""

    trial: int
    recipe: Recipe
    measurements: tuple[Measurement, ...]
    preset: str | None = None

    def at(self, rung: int) -> Measurement | None:
        return next((m for m in self.measurements if m.rung == rung), None)

    @property
    def search(self) -> Measurement | None:
        """The measurement at the search rung (rung 0)."""
        return self.at(0)

    @property
    def deciding(self) -> Measurement | None:
        """The answer-facing estimate: the highest-rung measurement that ran."""
        for m in reversed(self.measurements):
            if m.ok:
                return m
        return None

    @property
    def held(self) -> bool:
        d = self.deciding
        return d is not None and d.verdict.holds

    @property
    def rung(self) -> int:
        """The rung that decided this candidate (its highest successful measurement)."""
        d = self.deciding
        return d.rung if d is not None else self.measurements[-1].rung

    @property
    def top_measured(self) -> int:
        """The highest rung it was measured at, successfully or not."""
        return self.measurements[-1].rung

    def cost(self, primary: Any) -> float:
        """Its primary cost (in the budget's unit); inf when unknown."""
        return primary.value(self.costs) if primary is not None else 0.0

    @property
    def costs(self) -> dict[str, Any]:
        """Costs at the deciding rung, completed by the search rung's (rungs re-train, they do not
        re-time: latencies are measured once)."""
        d = self.deciding or self.measurements[-1]
        s = self.search
        base = dict(s.evaluation.costs) if s is not None else {}
        base.update({k: v for k, v in d.evaluation.costs.items() if v is not None})
        return base

    def point(self, primary: Any) -> tuple[float, float]:
        d = self.deciding
        return (d.quality if d is not None else -math.inf, self.cost(primary))

    def history(self) -> list[tuple[int, str]]:
        """Per rung it ran: ``held``, ``missed`` or ``failed``."""
        return [(m.rung, "failed" if not m.ok else "held" if m.verdict.holds else "missed")
                for m in self.measurements]

    def evidence(self) -> str:
        """Its history in a few characters: ``r0 ✓ r1 ✗`` (✓ held, ✗ missed, ! failed)."""
        sign = {"held": "✓", "missed": "✗", "failed": "!"}
        return " ".join(f"r{k} {sign[s]}" for k, s in self.history())

    def drop_growth(self) -> float | None:
        """pp by which the drop grew from the search rung to the deciding rung (None: one rung)."""
        d, s = self.deciding, self.search
        if d is None or s is None or d.rung == 0 or d.drop is None or s.drop is None:
            return None
        return d.drop - s.drop


@dataclass(frozen=True)
class Answer:
    """The study's answer, decided from the ledger.

    chosen: the recommended candidate (None: nothing held); feasible: some candidate held at
    its deciding rung (then ``chosen`` is one of them); rung: the rung whose evidence decides
    the answer (the chosen's deciding rung, else the highest rung reached); uncertain: why the
    data do not settle the answer (empty: settled); gate: the first-line warnings (a
    chance-level baseline, a validation set that cannot resolve the tolerance, a fallback to
    lower-rung evidence); front: the candidates that held and that no candidate held at the same
    or a higher rung dominates, cheapest first; alternatives: named entries of the front;
    closest: when nothing held, the candidates that missed least; power: what the deciding
    rung's validation set resolves.
    """

    chosen: Entry | None
    feasible: bool
    rung: int
    uncertain: tuple[str, ...] = ()
    gate: tuple[str, ...] = ()
    fallback: str | None = None
    front: tuple[Entry, ...] = ()
    alternatives: Mapping[str, Entry] = field(default_factory=dict)
    closest: tuple[Entry, ...] = ()
    power: Power | None = None


class Ledger:
    """Every measurement of a study, judged by its question (see the module docstring).

    Args:
        question: what was asked (its feasibility judges every measurement).
        rungs: the rungs, lowest first (rung 0 is the search's).
        entries: the candidates.
    """

    def __init__(self, question: Question, rungs: Sequence[RungInfo], entries: Iterable[Entry]):
        self.question = question
        self.rungs = tuple(sorted(rungs, key=lambda r: r.index))
        self.entries = tuple(sorted(entries, key=lambda e: e.trial))

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def build(cls, question: Question, rungs: Sequence[RungInfo],
              candidates: Iterable[tuple[int, Recipe | Mapping[str, Any], str | None,
                                         Mapping[int, Evaluation | Mapping[str, Any]]]]) -> "Ledger":
        """A ledger from raw evaluations: ``candidates`` yields ``(trial, recipe, preset,
        {rung: evaluation})``; each evaluation is judged against its rung's baseline."""
        info = {r.index: r for r in rungs}
        entries = []
        for trial, recipe, preset, evals in candidates:
            ms = []
            for k in sorted(evals):
                ev = evals[k]
                ev = ev if isinstance(ev, Evaluation) else Evaluation.from_dict(dict(ev))
                r = info.get(k)
                base = r.baseline if r is not None else None
                verdict = question.feasibility.verdict(ev, base.accuracy if base is not None else None)
                ms.append(Measurement(k, r.label if r is not None else f"rung {k}", ev, base, verdict))
            if ms:
                rec = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(dict(recipe))
                entries.append(Entry(int(trial), rec, tuple(ms), preset))
        return cls(question, rungs, entries)

    @classmethod
    def from_study(cls, study: Any) -> "Ledger":
        """Everything a study stored: its question, the baseline of every rung, the search
        rung's evaluated trials and every promoted candidate's evaluation on the rungs above."""
        from .search.rungs import read_rungs

        question = Question.from_attrs(study.user_attrs)
        rungs, evals = read_rungs(study)
        cands = []
        for trial, (recipe, preset, per_rung) in sorted(evals.items()):
            cands.append((trial, recipe, preset, per_rung))
        return cls.build(question, rungs, cands)

    # -- reading -----------------------------------------------------------------------------
    @property
    def primary(self) -> Any:
        return self.question.primary

    def rung(self, k: int) -> RungInfo | None:
        return next((r for r in self.rungs if r.index == k), None)

    def baseline(self, k: int) -> Baseline | None:
        r = self.rung(k)
        return r.baseline if r is not None else None

    def label(self, k: int) -> str:
        r = self.rung(k)
        return r.label if r is not None else f"rung {k}"

    def entry(self, trial: int) -> Entry | None:
        return next((e for e in self.entries if e.trial == trial), None)

    def measured_at(self, k: int, ok: bool = True) -> list[tuple[Entry, Measurement]]:
        """The candidates measured at rung ``k`` (successfully, with ``ok``), with that measurement."""
        out = []
        for e in self.entries:
            m = e.at(k)
            if m is not None and (m.ok or not ok):
                out.append((e, m))
        return out

    @property
    def top_rung(self) -> int:
        """The highest rung at which any candidate was measured successfully (0: none above)."""
        return max((m.rung for e in self.entries for m in e.measurements if m.ok), default=0)

    def power(self, k: int) -> Power | None:
        """What rung ``k``'s validation set resolves (None: no per-image baseline there)."""
        base = self.baseline(k)
        if base is None or base.correct is None or not len(base.correct):
            return None
        widths = [m.half_width for _, m in self.measured_at(k) if m.half_width is not None]
        return Power.at(len(base.correct), base.accuracy, self.question.feasibility.allowed_pp(base.accuracy),
                        widths, rung=k)

    # -- promotion ---------------------------------------------------------------------------
    def promotion(self, k: int, count: Any, limit: int | None = None) -> list[Entry]:
        """The candidates to measure at rung ``k``, from their measurements at rung ``k-1``.

        Eligible: every budget holds and the drop's interval reaches into the tolerance
        (:meth:`~recommender.feasibility.Feasibility.might_hold`). Candidates that held go up
        before those that only might; within each group, by Pareto rank on (minus the drop,
        primary cost), cheaper first. ``count(n)`` says how many of ``n`` eligible go up (the
        promotion policy); ``limit`` caps it (what the time budget allows).
        """
        fz = self.question.feasibility
        base = self.baseline(k - 1)
        acc = base.accuracy if base is not None else None
        pool = [(e, m) for e, m in self.measured_at(k - 1) if fz.might_hold(m.evaluation, acc)]
        held = [(e, m) for e, m in pool if m.verdict.holds]
        might = [(e, m) for e, m in pool if not m.verdict.holds]
        order: list[Entry] = []
        for group in (held, might):
            pts = [(m.quality, self._cost(e, m)) for e, m in group]
            rk = ranks(pts)
            idx = sorted(range(len(group)), key=lambda i: (rk[i], pts[i][1], -pts[i][0], group[i][0].trial))
            order += [group[i][0] for i in idx]
        n = count(len(pool)) if callable(count) else int(count)
        if limit is not None:
            n = min(n, max(0, limit))
        return order[:n]

    def _cost(self, e: Entry, m: Measurement) -> float:
        p = self.primary
        if p is None:
            return 0.0
        costs = dict(e.search.evaluation.costs) if e.search is not None else {}
        costs.update({a: v for a, v in m.evaluation.costs.items() if v is not None})
        return p.value(costs)

    # -- the answer --------------------------------------------------------------------------
    @cached_property
    def front(self) -> tuple[Entry, ...]:
        """Candidates that held at their deciding rung and that no candidate held at the same or
        a higher rung dominates on (minus the drop, primary cost); equal points keep the first
        trial; cheapest first."""
        held = [e for e in self.entries if e.held]
        p = self.primary
        pts = {e.trial: e.point(p) for e in held}
        out, seen = [], set()
        for e in sorted(held, key=lambda e: (pts[e.trial][1], -pts[e.trial][0], -e.rung, e.trial)):
            if any(o.rung >= e.rung and dominates(pts[o.trial], pts[e.trial]) for o in held):
                continue
            key = (e.rung, pts[e.trial])
            if key in seen:
                continue
            seen.add(key)
            out.append(e)
        return tuple(out)

    def answer(self) -> Answer:
        return self._answer

    @cached_property
    def _answer(self) -> Answer:
        p = self.primary
        held = [e for e in self.entries if e.held]
        front = self.front
        if held:
            r = max(e.rung for e in held)
            chosen = min((e for e in held if e.rung == r), key=lambda e: (e.cost(p), -e.point(p)[0], e.trial))
            fallback = None
            above = [e for e in self.entries if e.top_measured > r and any(m.ok and m.rung > r for m in e.measurements)]
            if above:
                tops = sorted({m.rung for e in above for m in e.measurements if m.ok and m.rung > r})
                fallback = (f"every candidate measured at rung {', '.join(map(str, tops))} missed there; this "
                            f"answer rests on rung {r} evidence alone ({self.label(r)}), which flattered those "
                            "candidates: confirm it before you ship it (a higher fidelity, or --checkpoint)")
            decided_at = r
        else:
            chosen, fallback = None, None
            decided_at = self.top_rung
        gate = []
        base = self.baseline(decided_at)
        if base is not None and base.source != "stated":
            chance = chance_level(base.accuracy, base.acc_low, self.question.num_classes)
            if chance:
                gate.append(f"{chance} (rung {decided_at}); train the baseline longer (a higher --fidelity), "
                            "give your trained --checkpoint, or use more training images")
        power = self.power(decided_at)
        if power is not None and not power.resolves:
            gate.append(power.sentence() or "")
        if fallback:
            gate.append(f"Fallback: {fallback}.")
        uncertain = list(chosen.deciding.verdict.uncertain) if chosen is not None and chosen.deciding else []
        uncertain += gate
        alternatives: dict[str, Entry] = {}
        closest: tuple[Entry, ...] = ()
        if chosen is not None:
            same = [e for e in front if e.rung == chosen.rung]
            best = max(same, key=lambda e: (e.point(p)[0], -e.cost(p), -e.trial)) if same else None
            if best is not None and best.trial != chosen.trial:
                alternatives["most accurate"] = best
            k = knee([e.point(p) for e in same])
            if k is not None and same[k].trial not in {chosen.trial} | {a.trial for a in alternatives.values()}:
                alternatives["knee"] = same[k]
            cheaper = [e for e in front if e.rung < chosen.rung and e.cost(p) < chosen.cost(p)]
            if cheaper:
                alternatives[f"cheaper, rung {cheaper[0].rung} evidence only"] = cheaper[0]
        else:
            tried = [e for e in self.entries if e.deciding is not None]
            closest = tuple(sorted(tried, key=lambda e: (e.deciding.verdict.excess, -e.rung, e.cost(p), e.trial))[:3])
        return Answer(chosen=chosen, feasible=chosen is not None, rung=decided_at, uncertain=tuple(uncertain),
                      gate=tuple(g for g in gate if g), fallback=fallback, front=front, alternatives=alternatives,
                      closest=closest, power=power)
