"""The answer: recommendation, Pareto front, explanation (rich), JSON and Markdown.

Everything here is read back from the study's storage, so ``recommend show STUDY`` renders the
same answer later, on another machine, or while workers are still running.

The recommendation is the feasible Pareto-optimal recipe with the lowest primary cost whose
confirmed drop stays within the tolerance; beside it, the most accurate feasible recipe and the
knee of the front. A drop whose 95 % interval crosses the tolerance is marked uncertain.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .constraints import Budget, MaxDrop, format_quantity
from .evaluation import Baseline, Evaluation
from .recipe import Recipe
from .search.recovery import SKIPPED_ATTR, is_interrupted
from .search.rungs import RungResult, rung_results

COST_ROWS = (  # (Costs field, label, unit)
    ("params", "params", "params"),
    ("nonzero_params", "non-zero params", "params"),
    ("mflops", "MFLOPs", "MFLOPs"),
    ("size_mb", "size (dense)", "MB"),
    ("sparse_size_mb", "size (sparse encoding)", "MB"),
    ("latency_ms", "latency (batch 1)", "ms"),
    ("latency_ort_ms", "latency in ONNX Runtime (batch 1)", "ms"),
    ("latency_predicted_ms", "latency on the profiled device (predicted, batch 1)", "ms"),
)
#: Rows shown only when the study measured them (a -ort budget, a profile's prediction).
OPTIONAL_COST_ROWS = ("latency_ort_ms", "latency_predicted_ms")


# -- reading trials ----------------------------------------------------------------------------

def completed(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "evaluation" in t.user_attrs and t.values is not None]


def is_feasible(t: FrozenTrial) -> bool:
    return all(c <= 0 for c in t.user_attrs.get("constraints", [1.0]))


def pareto_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Non-dominated trials for (accuracy up, primary cost down), sorted by cost ascending."""
    front = []
    for t in trials:
        a, c = t.values
        dominated = any((u.values[0] >= a and u.values[1] <= c) and (u.values[0] > a or u.values[1] < c)
                        for u in trials)
        if not dominated:
            front.append(t)
    # Equal points: keep the first trial only.
    seen, out = set(), []
    for t in sorted(front, key=lambda t: (t.values[1], -t.values[0], t.number)):
        if tuple(t.values) not in seen:
            seen.add(tuple(t.values))
            out.append(t)
    return out


def feasible_pareto(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front of the feasible trials, lowest primary cost first (equal points: the
    first trial only).

    Trials that stored their constraints with ``trial.set_constraint`` (Optuna 5) are read with
    ``study.best_trials``, which keeps only feasible trials in a constrained study; a study whose
    trials carry the constraints in their user attributes only (written before Optuna 5) is
    filtered here.
    """
    done = completed(study)
    if done and all(t.constraints for t in done):
        numbers = {t.number for t in done}
        # best_trials returns every trial of a duplicated point, in trial order: pareto_front()
        # keeps the first and sorts by cost (it re-checks dominance on this small set, no-op).
        return pareto_front([t for t in study.best_trials if t.number in numbers])
    return pareto_front([t for t in done if is_feasible(t)])


def knee(front: list[FrozenTrial]) -> FrozenTrial | None:
    """The front point farthest from the line joining its extremes (normalised axes)."""
    if len(front) < 3:
        return None
    xs = [t.values[1] for t in front]
    ys = [t.values[0] for t in front]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0 or y1 == y0:
        return None
    pts = [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in zip(xs, ys)]
    (ax, ay), (bx, by) = pts[0], pts[-1]
    dist = [abs((by - ay) * px - (bx - ax) * py + bx * ay - by * ax) for px, py in pts]
    i = max(range(len(front)), key=lambda k: dist[k])
    return front[i] if 0 < i < len(front) - 1 else None


# -- the recommendation -----------------------------------------------------------------------

@dataclass
class Choice:
    """One recipe with its rung-0 (search) evaluation and its evaluations on higher rungs."""

    trial: int
    recipe: Recipe
    proxy: Evaluation
    rungs: list[RungResult] = field(default_factory=list)
    preset: str | None = None

    @property
    def confirmed(self) -> Evaluation | None:
        """The evaluation on the highest rung it reached above the search rung (None: none)."""
        return self.rungs[-1].evaluation if self.rungs else None

    @property
    def top_rung(self) -> int:
        return self.rungs[-1].rung if self.rungs else 0

    @property
    def best(self) -> Evaluation:
        """The highest-fidelity evaluation that ran."""
        for r in reversed(self.rungs):
            if r.evaluation.ok:
                return r.evaluation
        return self.proxy

    def drop_growth(self) -> float | None:
        """pp by which the drop grew from the search rung to the highest rung (None: one rung)."""
        top = self.confirmed
        if top is None or top.drop_pp is None or self.proxy.drop_pp is None:
            return None
        return top.drop_pp - self.proxy.drop_pp


@dataclass
class Recommendation:
    """The study's answer. ``recipe``/``evaluation`` are None when nothing is feasible."""

    study_name: str
    storage: str
    spec: dict[str, Any]
    baseline: Baseline | None
    chosen: Choice | None
    feasible: bool
    rung_baselines: dict[int, Baseline] = field(default_factory=dict)
    rungs: list[dict[str, Any]] = field(default_factory=list)
    power: dict[str, Any] = field(default_factory=dict)
    warm_start_skipped: dict[str, str] = field(default_factory=dict)
    space_note: str = ""
    alternatives: dict[str, Choice] = field(default_factory=dict)
    front: list[Choice] = field(default_factory=list)
    closest: list[Choice] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    infeasible_reasons: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    importances: dict[str, dict[str, float]] = field(default_factory=dict)
    binding: list[str] = field(default_factory=list)
    study: optuna.Study | None = None
    #: files written for this answer by :func:`recommender.api.write_outputs` (name -> path);
    #: ``recipe`` only when the answer is feasible.
    files: dict[str, str] = field(default_factory=dict)

    # -- convenience for the API -------------------------------------------------------------
    @property
    def recipe(self) -> Recipe | None:
        return self.chosen.recipe if self.chosen else None

    @property
    def evaluation(self) -> Evaluation | None:
        return self.chosen.best if self.chosen else None

    @property
    def max_drop(self) -> MaxDrop:
        d = self.spec.get("max_drop", {"value": 0.0})
        return MaxDrop(**d)

    @property
    def budgets(self) -> list[Budget]:
        return [Budget(**b) for b in self.spec.get("budgets", [])]

    @property
    def pareto(self) -> pd.DataFrame:
        """The feasible Pareto front: one row per recipe (accuracy in %, costs in their units)."""
        rows = []
        for c in self.front:
            e = c.proxy
            rows.append({"trial": c.trial, "recipe": c.recipe.describe(), "preset": c.preset,
                         "accuracy_pct": _pct(e.accuracy), "drop_pp": e.drop_pp,
                         "drop_high_pp": e.drop_high_pp,
                         "confirmed_drop_pp": c.confirmed.drop_pp if c.confirmed else None,
                         **{k: e.costs.get(k) for k, _, _ in COST_ROWS}})
        return pd.DataFrame(rows)

    def build_model(self, num_classes: int | None = None):
        """Build the recommended model (untrained, fp32 architecture) — see ``recommend apply``."""
        from .models import build_model

        if self.recipe is None:
            raise ValueError("nothing feasible was found: no recipe to build")
        nc = num_classes or self.spec.get("num_classes") or 10
        return build_model(self.spec["model"], self.recipe.arch, num_classes=nc)

    def baseline_at(self, rung: int) -> Baseline | None:
        """The baseline a rung's drops are measured against."""
        return self.rung_baselines.get(rung, self.baseline if rung == 0 else None)

    @property
    def baseline_confirm(self) -> Baseline | None:
        """The baseline of the highest rung the recommendation reached."""
        return self.baseline_at(self.chosen.top_rung) if self.chosen else None

    def uncertain(self, e: Evaluation | None = None) -> bool:
        """The drop's 95 % interval crosses the tolerance (the data cannot settle it)."""
        e = e or self.evaluation
        base = self.baseline_at(self.chosen.top_rung) if self.chosen else self.baseline
        if e is None or e.drop_high_pp is None or base is None:
            return False
        return e.drop_high_pp > self.max_drop.allowed_pp(base.accuracy)

    def rung_rows(self, c: Choice) -> list[dict[str, Any]]:
        """A candidate's evaluation on every rung it ran, lowest first:
        ``{rung, fidelity, label, accuracy, drop, drop_interval}`` (fractions, pp)."""
        labels = {r["index"]: r.get("label") for r in self.rungs}
        rows = [(0, c.proxy)] + [(r.rung, r.evaluation) for r in c.rungs]
        out = []
        for k, e in rows:
            out.append({"rung": k, "fidelity": e.fidelity, "label": labels.get(k, e.fidelity),
                        "accuracy": e.accuracy, "drop": e.drop_pp,
                        "drop_interval": [e.drop_low_pp, e.drop_high_pp], "ok": e.ok})
        return out

    def warning(self, c: Choice) -> str | None:
        """A warning when the drop grew with fidelity (the cheap rung flattered the candidate)."""
        g = c.drop_growth()
        base = self.baseline_at(c.top_rung) or self.baseline
        if g is None or base is None:
            return None
        if g > max(1.0, 0.5 * self.max_drop.allowed_pp(base.accuracy)):
            return (f"trial {c.trial}: its drop grew by {g:+.1f} pp from the search rung to rung {c.top_rung}: "
                    "the cheap rung flattered it; full training may show a larger drop still")
        return None

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def choice(c: Choice | None) -> dict[str, Any] | None:
            if c is None:
                return None
            e = c.best
            return {"trial": c.trial, "preset": c.preset, "recipe": c.recipe.to_dict(),
                    "describe": c.recipe.describe(),
                    "accuracy": e.accuracy, "accuracy_interval": [e.acc_low, e.acc_high],
                    "drop": e.drop_pp, "drop_interval": [e.drop_low_pp, e.drop_high_pp],
                    "prob_within": e.prob_within, "fidelity": e.fidelity, "rung": c.top_rung,
                    "confirmed": c.confirmed is not None,
                    "proxy_accuracy": c.proxy.accuracy, "proxy_drop": c.proxy.drop_pp,
                    "rungs": self.rung_rows(c), "warning": self.warning(c),
                    **{k: e.costs.get(k) for k, _, _ in COST_ROWS},
                    "peak_memory_mb": e.costs.get("peak_memory_mb"),
                    "notes": e.notes}

        rec = choice(self.chosen)
        if rec is not None:
            rec["feasible"] = self.feasible
            rec["uncertain"] = self.uncertain()
        b = self.baseline
        return {
            "study": {"name": self.study_name, "storage": self.storage, "n_trials": self.counts.get("finished", 0),
                      **self.counts},
            "spec": self.spec,
            "baseline": None if b is None else {
                "accuracy": b.accuracy, "accuracy_interval": [b.acc_low, b.acc_high], "source": b.source,
                "fidelity": b.fidelity, **{k: b.costs.get(k) for k, _, _ in COST_ROWS}},
            "recommended": rec,
            "feasible": self.feasible,
            "power": self.power,
            "rungs": self.rungs,
            "warm_start_skipped": self.warm_start_skipped,
            "space_note": self.space_note,
            "alternatives": {k: choice(v) for k, v in self.alternatives.items()},
            "pareto": [choice(c) for c in self.front],
            "closest_infeasible": [choice(c) for c in self.closest],
            "infeasible_reasons": self.infeasible_reasons,
            "failures": self.failures,
            "importances": self.importances,
            "binding_constraints": self.binding,
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), default=_json_default, **kw)

    def renderable(self) -> Group:
        return render(self)

    def explain(self, width: int = 110) -> str:
        """The explanation as plain text (what the terminal shows, without colours)."""
        console = Console(record=True, width=width, file=_Null(), color_system=None)
        console.print(self.renderable())
        return console.export_text()

    def to_markdown(self) -> str:
        return markdown(self)


class _Null:
    def write(self, *_: Any) -> None:
        pass

    def flush(self) -> None:
        pass


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _choice(t: FrozenTrial, rungs: dict[int, list[RungResult]]) -> Choice:
    return Choice(t.number, Recipe.from_dict(t.user_attrs["recipe"]), Evaluation.from_dict(t.user_attrs["evaluation"]),
                  sorted(rungs.get(t.number, []), key=lambda r: r.rung), t.user_attrs.get("preset"))


def _violations(t: FrozenTrial, budgets: list[Budget]) -> list[str]:
    cons = t.user_attrs.get("constraints", [])
    names = ["max drop"] + [b.describe() for b in budgets]
    return [n for n, c in zip(names, cons) if c > 0]


def _holds(e: Evaluation, base: Baseline | None, max_drop: MaxDrop, budgets: list[Budget]) -> bool:
    return (e.ok and e.drop_pp is not None and base is not None
            and e.drop_pp <= max_drop.allowed_pp(base.accuracy)
            and all(b.violation(e.costs) <= 0 for b in budgets))


def _excess(e: Evaluation, base: Baseline | None, max_drop: MaxDrop, budgets: list[Budget]) -> float:
    if not e.ok or e.drop_pp is None or base is None:
        return math.inf
    allowed = max_drop.allowed_pp(base.accuracy)
    return max(0.0, (e.drop_pp - allowed) / max(allowed, 0.1)) + sum(max(0.0, b.violation(e.costs)) for b in budgets)


def recommendation_from_study(study: optuna.Study, storage: str = "") -> Recommendation:
    """Build the answer from what the study stored (trials, baselines, promotion rungs).

    The recommendation is chosen at the highest rung reached: the candidate with the lowest
    primary cost whose drop there stays within the tolerance (and whose costs meet every budget).
    Without promotions, the lowest-cost point of the feasible Pareto front of the search rung.
    """
    attrs = study.user_attrs
    spec = dict(attrs.get("spec", {}))
    budgets = [Budget(**b) for b in spec.get("budgets", [])]
    max_drop = MaxDrop(**spec["max_drop"]) if "max_drop" in spec else MaxDrop(0.0)
    baseline = Baseline.from_dict(attrs["baseline"]) if "baseline" in attrs else None
    infos, per_trial = rung_results(study._storage, study.study_name)
    rung_baselines = {0: baseline} if baseline else {}
    for info in infos:
        if info.get("baseline"):
            rung_baselines[info["index"]] = Baseline.from_dict(info["baseline"])
    rung0 = next((r for r in attrs.get("rungs", []) if r.get("index") == 0), None)
    rungs_info = [{"index": 0, "label": rung0["label"] if rung0 else spec.get("fidelity", "search")}]
    rungs_info += [{k: v for k, v in i.items() if k in ("index", "label", "promoted", "skipped")} for i in infos]

    all_trials = study.get_trials(deepcopy=False)
    done = [t for t in completed(study) if not t.user_attrs.get(SKIPPED_ATTR)]
    feas = [t for t in done if is_feasible(t)]
    by_number = {t.number: t for t in done}
    front_trials = [t for t in feasible_pareto(study) if not t.user_attrs.get(SKIPPED_ATTR)]
    front = [_choice(t, per_trial) for t in front_trials]
    promoted = {n for n, rs in per_trial.items() if rs}
    counts = {
        "finished": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in all_trials),
        "evaluated": len(done), "complete": len(done), "feasible": len(feas), "infeasible": len(done) - len(feas),
        "pruned": sum(t.state == TrialState.PRUNED for t in all_trials)
        + sum(bool(t.user_attrs.get(SKIPPED_ATTR)) for t in all_trials if t.state == TrialState.COMPLETE),
        "failed": sum(t.state == TrialState.FAIL and not is_interrupted(t) for t in all_trials),
        "interrupted": sum(is_interrupted(t) for t in all_trials),
        "running": sum(t.state == TrialState.RUNNING for t in all_trials),
        "sampled": sum(1 for t in done if not t.user_attrs.get("preset")),
        "confirmed": len(promoted),
        "baseline_evaluations": int(attrs.get("baseline_evaluations", 0)),
    }
    reasons: Counter[str] = Counter()
    for t in done:
        if not is_feasible(t):
            for v in _violations(t, budgets):
                reasons[v] += 1
    for t in all_trials:
        r = t.user_attrs.get("pruned_reason") if t.state == TrialState.PRUNED else t.user_attrs.get(SKIPPED_ATTR)
        if r:
            # "structure breaks the budget before training: params <= 5M best case ..." -> its head
            head, _, tail = str(r).partition(":")
            reasons[f"{head}: {tail.split(' best case')[0].strip()}" if tail.strip() else head] += 1
    failures: Counter[str] = Counter(t.user_attrs.get("fail_reason", "stale or interrupted trial")
                                     for t in all_trials if t.state == TrialState.FAIL)

    top = max((r.rung for rs in per_trial.values() for r in rs if r.evaluation.ok), default=0)
    chosen, feasible, closest = None, False, []
    primary = budgets[0] if budgets else None

    def cost(c: Choice) -> float:
        return primary.value(c.best.costs) if primary else 0.0

    if top == 0:
        # Lowest primary cost on the feasible front of the search rung.
        if front:
            chosen, feasible = front[0], True
    else:
        at_top = [_choice(by_number[n], per_trial) for n, rs in per_trial.items()
                  if n in by_number and any(r.rung == top for r in rs)]
        holding = [c for c in at_top if c.top_rung == top and _holds(c.best, rung_baselines.get(top), max_drop, budgets)]
        if holding:
            chosen, feasible = min(holding, key=lambda c: (cost(c), c.trial)), True
        else:
            closest = sorted(at_top, key=lambda c: (_excess(c.best, rung_baselines.get(top), max_drop, budgets), cost(c)))[:3]
    if not feasible and not closest:
        # The answer always names trained candidates: those that missed the constraints least.
        by_excess = sorted(done, key=lambda t: (sum(max(0.0, c) for c in t.user_attrs.get("constraints", [1e9])),
                                                t.values[1] if t.values else math.inf))
        closest = [_choice(t, per_trial) for t in by_excess[:3]]

    alternatives: dict[str, Choice] = {}
    if front:
        alternatives["most accurate"] = max(front, key=lambda c: (c.proxy.accuracy or 0.0, -c.trial))
        k = knee(front_trials)
        if k is not None:
            alternatives["knee"] = _choice(k, per_trial)
    binding = _binding(chosen, done, budgets, max_drop) if chosen and feasible else []
    power = dict(attrs.get("power", {}))
    widths = sorted((e.drop_high_pp - e.drop_low_pp) / 2 for e in (Evaluation.from_dict(t.user_attrs["evaluation"])
                                                                   for t in done)
                    if e.drop_high_pp is not None and e.drop_low_pp is not None and e.ok)
    if power and widths and baseline is not None and baseline.correct is not None:
        power["measured_pp"] = round(widths[len(widths) // 2], 3)  # median half-width of the candidates' intervals
    return Recommendation(
        study_name=study.study_name, storage=storage, spec=spec, baseline=baseline, chosen=chosen,
        feasible=feasible, rung_baselines=rung_baselines, rungs=rungs_info, power=power,
        warm_start_skipped=dict(attrs.get("warm_start_skipped", {})), space_note=str(attrs.get("space_note", "")),
        alternatives=alternatives, front=front, closest=closest,
        counts=counts, infeasible_reasons=dict(reasons), failures=dict(failures),
        importances=_importances(study), binding=binding, study=study)


def _binding(chosen: Choice, done: list[FrozenTrial], budgets: list[Budget], max_drop: MaxDrop) -> list[str]:
    """Constraints that stopped a cheaper candidate: what a user would relax to get more."""
    cheaper = [t for t in done if t.values[1] < chosen.proxy.costs.get(budgets[0].cost_field, math.inf)
               and not is_feasible(t)]
    hits: Counter[str] = Counter()
    for t in cheaper:
        for v in _violations(t, budgets):
            hits[v] += 1
    return [f"{name} (stopped {n} cheaper candidate{'s' if n != 1 else ''})" for name, n in hits.most_common()]


def _importances(study: optuna.Study) -> dict[str, dict[str, float]]:
    """fANOVA-free, fast importances (mean decrease impurity) for both objectives."""
    done = completed(study)
    if len(done) < 4:
        return {}
    out: dict[str, dict[str, float]] = {}
    names = study.user_attrs.get("objective_names", ["accuracy", "cost"])
    for i, name in enumerate(names):
        try:
            evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
            imp = optuna.importance.get_param_importances(
                study, evaluator=evaluator, target=lambda t, i=i: t.values[i])
            out[name] = {k: round(float(v), 3) for k, v in imp.items()}
        except Exception:  # too few trials sharing parameters; importances are optional
            continue
    return out


# -- rendering ---------------------------------------------------------------------------------

def _fmt_acc(e: Evaluation | Baseline | None) -> str:
    if e is None or e.accuracy is None:
        return "n/a"
    return f"{100 * e.accuracy:.2f}% [{100 * e.acc_low:.1f}, {100 * e.acc_high:.1f}]"


def _fmt_drop(e: Evaluation | None) -> str:
    if e is None or e.drop_pp is None:
        return "n/a"
    return f"{e.drop_pp:+.2f} pp [{e.drop_low_pp:+.1f}, {e.drop_high_pp:+.1f}]"


def _factor(base: Any, new: Any) -> str:
    try:
        if base and new:
            return f"{float(base) / float(new):.1f}x smaller"
    except (TypeError, ValueError, ZeroDivisionError):
        pass
    return ""


def _power_line(rec: Recommendation) -> str | None:
    """One line when the validation set cannot resolve the tolerance (honest power)."""
    p = rec.power
    if not p or p.get("min_resolvable_drop_pp") is None:
        return None
    mrd, tol = float(p["min_resolvable_drop_pp"]), float(p.get("tolerance_pp", rec.max_drop.value))
    measured = p.get("measured_pp")
    seen = f"; measured on the candidates: ±{measured:.1f} pp" if measured is not None else ""
    if max(mrd, measured or 0.0) <= tol and (measured is None or measured <= tol):
        return None
    return (f"Power: {p.get('n_val')} validation images at a {100 * p.get('baseline_accuracy', 0):.1f}% baseline "
            f"resolve drops of about ±{mrd:.1f} pp (errors independent of the baseline's{seen}), wider than the "
            f"{tol:g} pp tolerance: this data cannot establish 'within {tol:g} pp'; use more validation images.")


def _rung_table(rec: Recommendation, c: Choice) -> Table:
    t = Table(box=box.SIMPLE, title="Drop on every rung it ran (lowest fidelity first)", title_justify="left")
    for col in ("rung", "fidelity", "baseline", "candidate", "drop pp [95% CI]"):
        t.add_column(col, justify="left" if col == "fidelity" else "right")
    for row in rec.rung_rows(c):
        k = row["rung"]
        e = c.proxy if k == 0 else next(r.evaluation for r in c.rungs if r.rung == k)
        t.add_row(str(k), str(row["label"]), _fmt_acc(rec.baseline_at(k)), _fmt_acc(e) if e.ok else e.reason[:40],
                  _fmt_drop(e))
    return t


def render(rec: Recommendation) -> Group:
    parts: list[Any] = []
    spec = rec.spec
    budgets, md = rec.budgets, rec.max_drop
    head = Text()
    head.append(f"{spec.get('model', '?')} on {spec.get('dataset', '?')}", style="bold")
    head.append(f" — max drop {md.describe()}; budgets: " + ", ".join(b.describe() for b in budgets))
    parts.append(head)
    power = _power_line(rec)
    if power:
        parts.append(Text(power, style="yellow"))
    if rec.space_note:
        parts.append(Text(rec.space_note, style="dim"))
    c = rec.chosen
    if c is None and not rec.counts.get("finished"):
        parts.append(Panel(Text("No candidate finished yet: no recommendation.", style="bold red")))
    elif c is None:
        pass  # nothing feasible: said below, with the closest candidates and what they miss
    else:
        e = c.best
        status = ("[bold green]FEASIBLE[/]" if rec.feasible else "[bold red]NOT FEASIBLE[/]")
        if rec.feasible and rec.uncertain():
            status += " [yellow](uncertain: the drop's 95% interval crosses the tolerance)[/]"
        where = f"rung {c.top_rung}: {rec.rung_rows(c)[-1]['label']}"
        title = f"Recommended recipe (trial {c.trial}{', preset ' + c.preset if c.preset else ''}; {where}) {status}"
        t = Table(box=box.SIMPLE_HEAVY, show_edge=False)
        t.add_column("")
        t.add_column("baseline", justify="right")
        t.add_column("recommended", justify="right")
        t.add_column("change", justify="right")
        t.add_row(f"accuracy (95% CI) at rung {c.top_rung}", _fmt_acc(rec.baseline_at(c.top_rung)), _fmt_acc(e),
                  "drop " + _fmt_drop(e))
        bc = rec.baseline.costs if rec.baseline else {}
        for key, label, unit in COST_ROWS:
            nv = e.costs.get(key) if e.costs.get(key) is not None else c.proxy.costs.get(key)
            if key in OPTIONAL_COST_ROWS and nv is None and bc.get(key) is None:
                continue
            t.add_row(label, format_quantity(bc.get(key), unit), format_quantity(nv, unit), _factor(bc.get(key), nv))
        body = [Text(c.recipe.describe(), style="bold cyan"), t]
        if len(rec.rungs) > 1:
            body.append(_rung_table(rec, c))
        notes = list(e.notes or [])
        warn = rec.warning(c)
        if warn:
            notes.insert(0, "WARNING: " + warn)
        if c.recipe.quant.active and "flops" not in _lowers(c.recipe.quant):
            notes.append(f"{c.recipe.quant.method} changes size and latency, not the multiply-accumulate count (MFLOPs).")
        if c.recipe.prune.active and c.top_rung == 0 and rec.baseline and rec.baseline.source == "trained":
            notes.append("the pruning drop is measured from the baseline as this rung trains it, briefly: "
                         "against long-trained references such drops were several pp off, both ways "
                         "(overstated on digits, understated on cifar10-mini; docs/measurements.md). "
                         "A higher rung measures it from a longer-trained baseline, --checkpoint "
                         "from your trained model.")
        if c.recipe.prune.active and rec.baseline and rec.baseline.source == "checkpoint":
            notes.append("the pruning drop is measured from your checkpoint after the rung's short recovery "
                         "fine-tune: from the same trained weights, such drops were within 2.4 pp of a "
                         "2-epoch fine-tune's on cifar10-mini and overstated by 2.4-52 pp on digits "
                         "(docs/measurements.md); fine-tune the pruned network before you ship it.")
        if c.recipe.prune.active and "params" not in _lowers(c.recipe.prune):
            notes.append(f"{c.recipe.prune.method} zeroes weights: params and dense size stay, non-zero "
                         "params and the sparse encoding fall.")
        if rec.binding:
            notes.append("what bound the answer: " + "; ".join(rec.binding))
        for n in notes:
            body.append(Text("• " + n, style="yellow" if n.startswith("WARNING") else "dim"))
        parts.append(Panel(Group(*body), title=title, title_align="left"))
    note = nothing_feasible_note(rec)
    if note:
        parts.append(Text(note + (" Closest candidates (what they miss):" if rec.closest else ""), style="bold red"))
        for ch in rec.closest:
            miss = _misses(ch.best, rec.baseline_at(ch.top_rung), md, budgets)
            parts.append(Text(f"  trial {ch.trial} (rung {ch.top_rung}): {ch.recipe.describe()} — "
                              f"{_fmt_acc(ch.best)}, drop {_fmt_drop(ch.best)}; misses: {miss}"))
    rows = rec.front or rec.closest
    if rows:
        t = Table(title="Feasible Pareto front at the search rung (accuracy vs primary cost)" if rec.front
                  else "Closest candidates", box=box.SIMPLE, title_justify="left")
        top_col = "top rung drop" if len(rec.rungs) > 1 else None
        cols = ("trial", "accuracy", "drop pp") + ((top_col,) if top_col else ()) + ("params", "MFLOPs", "MB", "ms")
        for col in cols:
            t.add_column(col, justify="right", no_wrap=True)
        t.add_column("recipe", justify="left", overflow="fold", ratio=1, min_width=30)
        for ch in rows:
            e = ch.proxy
            cells = [str(ch.trial) + (" *" if rec.chosen and ch.trial == rec.chosen.trial else ""),
                     f"{100 * (e.accuracy or 0):.2f}%", f"{e.drop_pp:+.2f}" if e.drop_pp is not None else "n/a"]
            if top_col:
                cells.append(f"{ch.confirmed.drop_pp:+.2f} (r{ch.top_rung})"
                             if ch.confirmed and ch.confirmed.drop_pp is not None else "")
            cells += [format_quantity(e.costs.get("params"), "params").replace(" params", ""),
                      f"{e.costs.get('mflops'):.1f}" if e.costs.get("mflops") is not None else "n/a",
                      f"{e.costs.get('size_mb'):.2f}" if e.costs.get("size_mb") is not None else "n/a",
                      f"{e.costs.get('latency_ms'):.1f}" if e.costs.get("latency_ms") is not None else "n/a",
                      (ch.preset + ": " if ch.preset else "") + ch.recipe.describe()]
            t.add_row(*cells)
        parts.append(t)
    if rec.alternatives:
        lines = [f"{name}: trial {ch.trial} — {ch.recipe.describe()} — {100 * (ch.proxy.accuracy or 0):.2f}% at rung 0, "
                 + format_quantity(ch.proxy.costs.get(budgets[0].cost_field) if budgets else None,
                                   budgets[0].unit if budgets else "")
                 for name, ch in rec.alternatives.items()]
        parts.append(Panel("\n".join(lines), title="Alternatives", title_align="left"))
    parts.append(Text(summary_line(rec.counts, len(rec.rungs))))
    for info in rec.rungs[1:]:
        if info.get("skipped"):
            parts.append(Text(f"Rung {info['index']} ({info.get('label')}) not run: {info['skipped']}.", style="yellow"))
    if rec.warm_start_skipped:
        parts.append(Text(skipped_presets_line(rec.warm_start_skipped), style="dim"))
    if rec.infeasible_reasons:
        parts.append(Text("Why candidates were infeasible or skipped: " + "; ".join(
            f"{k} ({v})" for k, v in sorted(rec.infeasible_reasons.items(), key=lambda kv: -kv[1])), style="dim"))
    if rec.failures:
        parts.append(Text("Failures: " + "; ".join(f"{k} ({v})" for k, v in rec.failures.items()), style="dim"))
    for obj, imp in rec.importances.items():
        top = sorted(imp.items(), key=lambda kv: -kv[1])[:5]
        parts.append(Text(f"What mattered for {obj}: " + ", ".join(f"{k} {v:.2f}" for k, v in top), style="dim"))
    return Group(*parts)


def _lowers(cfg: Any) -> frozenset[str]:
    from .compress.methods import get_method

    return get_method(cfg.stage, cfg.method).lowers


def _misses(e: Evaluation, base: Baseline | None, md: MaxDrop, budgets: list[Budget]) -> str:
    """What a candidate misses, in words (drop over the tolerance, budgets over their limits)."""
    out = []
    if not e.ok:
        return e.reason or "failed"
    if e.drop_pp is not None and base is not None and e.drop_pp > md.allowed_pp(base.accuracy):
        out.append(f"drop {e.drop_pp:+.2f} pp > {md.allowed_pp(base.accuracy):g} pp")
    for b in budgets:
        if b.violation(e.costs) > 0:
            out.append(f"{b.metric} {format_quantity(b.value(e.costs), b.unit)} > {format_quantity(b.limit, b.unit)}")
    return "; ".join(out) or "nothing (within every constraint)"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def skipped_presets_line(skipped: dict[str, str]) -> str:
    """One sentence on the warm-start presets that were not enqueued, grouped by why."""
    na = [n for n, why in skipped.items() if why.startswith("does not apply")]
    by_structure = [n for n in skipped if n not in na]
    parts = []
    if by_structure:
        parts.append(f"skipped by structure: {', '.join(by_structure)}")
    if na:
        parts.append(f"not applicable to this model: {', '.join(na)}")
    return f"Presets not enqueued ({'; '.join(parts)})."


def summary_line(counts: dict[str, int], rungs: int = 1) -> str:
    """One sentence counting the study's trials: evaluated = feasible + infeasible (the sampler's
    and the presets'), skipped before training, failed, interrupted (queued again); running trials (other workers) are named
    apart; promotions when there are rungs above the search's."""
    n = counts
    text = (f"{_plural(n.get('evaluated', 0), 'candidate')} evaluated ({n.get('sampled', 0)} chosen by the "
            f"sampler): {n.get('feasible', 0)} feasible, {n.get('infeasible', 0)} infeasible at the search rung; "
            f"{n.get('pruned', 0)} skipped before training, {n.get('failed', 0)} failed")
    if n.get("interrupted"):
        text += (f"; {n['interrupted']} stopped before the end (Ctrl-C, a killed worker or the time budget) "
                 "and queued again for a resumed run")
    if n.get("running"):
        text += f"; {n['running']} still running"
    if rungs > 1:
        text += f"; {n.get('confirmed', 0)} promoted to higher rungs ({rungs} rungs in all)"
    return text + "."


def nothing_feasible_note(rec: Recommendation) -> str:
    """Why there is no feasible answer (empty when there is one or no trial finished yet)."""
    if rec.feasible or not rec.counts.get("finished"):
        return ""
    if rec.front:  # feasible at the search rung, but none held on the highest rung reached
        return ("Nothing feasible was found: the candidates that met every constraint at the search rung "
                "exceeded the tolerance on the highest rung they were promoted to; no recipe is recommended.")
    if not rec.closest:
        return ("Nothing feasible was found: no candidate was trained to the end (all were skipped or failed: "
                "reasons below); no recipe is recommended.")
    return "Nothing feasible was found: no candidate met every constraint; no recipe is recommended."


def _md(value: Any) -> str:
    """A Markdown table cell: ``|`` escaped (it would split the cell), no line breaks."""
    return " ".join(str(value).splitlines()).replace("|", "\\|")


def _md_row(*cells: Any) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"


def markdown(rec: Recommendation) -> str:
    """The explanation as Markdown (the dashboard note, ``studies/<study>/report.md``); every
    table cell is escaped."""
    d = rec.to_dict()
    lines = [f"# Recommendation for {rec.spec.get('model')} on {rec.spec.get('dataset')}", ""]
    lines.append(f"Max drop {rec.max_drop.describe()}; budgets: " + ", ".join(b.describe() for b in rec.budgets))
    lines.append("")
    power = _power_line(rec)
    if power:
        lines += [f"*{power}*", ""]
    if rec.space_note:
        lines += [rec.space_note, ""]
    r = d["recommended"]
    if r is None and not rec.counts.get("finished"):
        lines.append("**No candidate finished yet.**")
    elif r is not None:
        state = "feasible" if rec.feasible else "NOT feasible"
        if r.get("uncertain"):
            state += " (uncertain: the drop interval crosses the tolerance)"
        lines += [f"**Recommended** (trial {r['trial']}, {state}): `{r['describe']}`", "",
                  "| | baseline | recommended |", "|---|---:|---:|"]
        b = d["baseline"] or {}
        acc = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"  # noqa: E731
        lines.append(_md_row("accuracy", acc(b.get("accuracy")), acc(r["accuracy"])))
        drop = (f"{r['drop']:+.2f} [{r['drop_interval'][0]:+.1f}, {r['drop_interval'][1]:+.1f}]"
                if r["drop"] is not None else "n/a")
        lines.append(_md_row("drop (pp)", "", drop))
        for key, label, unit in COST_ROWS:
            lines.append(_md_row(label, format_quantity(b.get(key), unit), format_quantity(r.get(key), unit)))
        lines.append("")
        if len(r.get("rungs", [])) > 1 or len(rec.rungs) > 1:
            lines += ["Drop on every rung it ran (lowest fidelity first):", "",
                      "| rung | fidelity | accuracy | drop (pp) [95% CI] |", "|---:|---|---:|---:|"]
            for row in r["rungs"]:
                lo, hi = row["drop_interval"]
                drop = "n/a" if row["drop"] is None else f"{row['drop']:+.2f} [{lo:+.1f}, {hi:+.1f}]"
                lines.append(_md_row(row["rung"], row["label"], "n/a" if row["accuracy"] is None
                                     else f"{100 * row['accuracy']:.2f}%", drop))
            lines.append("")
        if r.get("warning"):
            lines += [f"**Warning:** {r['warning']}", ""]
    note = nothing_feasible_note(rec)
    if note:
        lines += [f"**{note}**"]
    tables = [("Feasible Pareto front", d["pareto"]), ("Closest candidates (infeasible)", d["closest_infeasible"])]
    for title, rows in tables:
        if not rows:
            continue
        extra = [k for k in OPTIONAL_COST_ROWS if any(p.get(k) is not None for p in rows)]
        heads = "".join({"latency_ort_ms": " ms (ONNX Runtime) |",
                         "latency_predicted_ms": " ms (predicted) |"}[k] for k in extra)
        lines += ["", f"## {title}", "", "| trial | recipe | accuracy | drop (pp) | params | MFLOPs | MB | ms |" + heads,
                  "|---:|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra)]
        for p in rows:
            lines.append(_md_row(p["trial"], p["describe"], f"{100 * (p['proxy_accuracy'] or 0):.2f}%",
                                 "n/a" if p["proxy_drop"] is None else f"{p['proxy_drop']:+.2f}", p["params"],
                                 _round(p["mflops"], 1), _round(p["size_mb"], 2), _round(p["latency_ms"], 1),
                                 *(_round(p.get(k), 1) for k in extra)))
    lines += ["", summary_line(rec.counts, len(rec.rungs))]
    for info in rec.rungs[1:]:
        if info.get("skipped"):
            lines += ["", f"Rung {info['index']} ({info.get('label')}) not run: {info['skipped']}."]
    if rec.warm_start_skipped:
        lines += ["", skipped_presets_line(rec.warm_start_skipped)]
    if rec.infeasible_reasons:
        lines.append("")
        lines.append("Why candidates were infeasible or pruned: " + "; ".join(
            f"{k} ({v})" for k, v in sorted(rec.infeasible_reasons.items(), key=lambda kv: -kv[1])))
    if rec.failures:
        lines += ["", "Failures: " + "; ".join(f"{k} ({v})" for k, v in rec.failures.items())]
    if rec.binding:
        lines.append("What bound the answer: " + "; ".join(rec.binding))
    return "\n".join(lines) + "\n"


def _round(x: float | None, digits: int) -> str:
    return "n/a" if x is None else str(round(x, digits))
