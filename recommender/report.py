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
from .search.objective import counts_as_trial

COST_ROWS = (  # (Costs field, label, unit)
    ("params", "params", "params"),
    ("nonzero_params", "non-zero params", "params"),
    ("mflops", "MFLOPs", "MFLOPs"),
    ("size_mb", "size (dense)", "MB"),
    ("sparse_size_mb", "size (sparse encoding)", "MB"),
    ("latency_ms", "latency (batch 1)", "ms"),
)


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
    """The Pareto front of the feasible trials, lowest primary cost first."""
    return pareto_front([t for t in completed(study) if is_feasible(t)])


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
    """One recipe on the front with its proxy evaluation and, if any, its confirmed one."""

    trial: int
    recipe: Recipe
    proxy: Evaluation
    confirmed: Evaluation | None = None
    preset: str | None = None

    @property
    def best(self) -> Evaluation:
        return self.confirmed if self.confirmed is not None and self.confirmed.ok else self.proxy


@dataclass
class Recommendation:
    """The study's answer. ``recipe``/``evaluation`` are None when nothing is feasible."""

    study_name: str
    storage: str
    spec: dict[str, Any]
    baseline: Baseline | None
    baseline_confirm: Baseline | None
    chosen: Choice | None
    feasible: bool
    alternatives: dict[str, Choice] = field(default_factory=dict)
    front: list[Choice] = field(default_factory=list)
    closest: list[Choice] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    infeasible_reasons: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    importances: dict[str, dict[str, float]] = field(default_factory=dict)
    binding: list[str] = field(default_factory=list)
    study: optuna.Study | None = None

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

    def uncertain(self, e: Evaluation | None = None) -> bool:
        e = e or self.evaluation
        base = self.baseline_confirm if (self.chosen and self.chosen.confirmed) else self.baseline
        if e is None or e.drop_high_pp is None or base is None:
            return False
        return e.drop_high_pp > self.max_drop.allowed_pp(base.accuracy)

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
                    "prob_within": e.prob_within, "fidelity": e.fidelity,
                    "confirmed": c.confirmed is not None,
                    "proxy_accuracy": c.proxy.accuracy, "proxy_drop": c.proxy.drop_pp,
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


def _choice(t: FrozenTrial, confirmed: dict[str, Any]) -> Choice:
    conf = confirmed.get(str(t.number))
    return Choice(t.number, Recipe.from_dict(t.user_attrs["recipe"]), Evaluation.from_dict(t.user_attrs["evaluation"]),
                  Evaluation.from_dict(conf) if conf else None, t.user_attrs.get("preset"))


def _violations(t: FrozenTrial, budgets: list[Budget]) -> list[str]:
    cons = t.user_attrs.get("constraints", [])
    names = ["max drop"] + [b.describe() for b in budgets]
    return [n for n, c in zip(names, cons) if c > 0]


def recommendation_from_study(study: optuna.Study, storage: str = "") -> Recommendation:
    """Build the answer from what the study stored (trials, baseline, confirm stage)."""
    attrs = study.user_attrs
    spec = dict(attrs.get("spec", {}))
    budgets = [Budget(**b) for b in spec.get("budgets", [])]
    max_drop = MaxDrop(**spec["max_drop"]) if "max_drop" in spec else MaxDrop(0.0)
    baseline = Baseline.from_dict(attrs["baseline"]) if "baseline" in attrs else None
    bconf = Baseline.from_dict(attrs["baseline_confirm"]) if "baseline_confirm" in attrs else None
    confirmed = dict(attrs.get("confirmed", {}))

    all_trials = study.get_trials(deepcopy=False)
    done = completed(study)
    feas = [t for t in done if is_feasible(t)]
    front = [_choice(t, confirmed) for t in pareto_front(feas)]
    # Structure skips of the constraint policy trained nothing and do not count as trials.
    skipped = [t for t in all_trials if not counts_as_trial(t)]
    counts = {
        "finished": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in all_trials)
        - len(skipped),
        "skipped_by_structure": len(skipped),
        "complete": len(done), "feasible": len(feas), "infeasible": len(done) - len(feas),
        "pruned": sum(t.state == TrialState.PRUNED for t in all_trials),
        "failed": sum(t.state == TrialState.FAIL for t in all_trials),
        "running": sum(t.state == TrialState.RUNNING for t in all_trials),
        "confirmed": len(confirmed),
        "baseline_evaluations": int(attrs.get("baseline_evaluations", 0)),
    }
    reasons: Counter[str] = Counter()
    for t in done:
        if not is_feasible(t):
            for v in _violations(t, budgets):
                reasons[v] += 1
    for t in all_trials:
        if t.state == TrialState.PRUNED:
            r = t.user_attrs.get("pruned_reason", "pruned")
            # "structure breaks the budget before training: params 4.2e7 > 5e6" -> "... : params"
            head, _, tail = r.partition(":")
            reasons[f"{head}: {tail.split()[0]}" if tail.strip() else head] += 1
    failures: Counter[str] = Counter(t.user_attrs.get("fail_reason", "stale or interrupted trial")
                                     for t in all_trials if t.state == TrialState.FAIL)

    # Lowest primary cost whose confirmed drop (or proxy drop, without a confirm stage) is within
    # the tolerance.
    chosen, feasible = None, False
    for c in front:
        if c.confirmed is not None:
            base = bconf or baseline
            if c.confirmed.ok and c.confirmed.drop_pp is not None and base is not None and \
                    c.confirmed.drop_pp <= max_drop.allowed_pp(base.accuracy):
                chosen, feasible = c, True
                break
        elif not confirmed:
            chosen, feasible = c, True
            break
    if chosen is None and front:
        # Nothing confirmed: the most accurate confirmed candidate is shown, marked infeasible.
        chosen = max(front, key=lambda c: (c.best.accuracy or 0.0))
        feasible = False
    closest = []
    if not front:
        by_excess = sorted(done, key=lambda t: sum(max(0.0, c) for c in t.user_attrs.get("constraints", [1e9])))
        closest = [_choice(t, confirmed) for t in by_excess[:3]]

    alternatives: dict[str, Choice] = {}
    if front:
        alternatives["most accurate"] = max(front, key=lambda c: (c.proxy.accuracy or 0.0, -c.trial))
        k = knee(pareto_front(feas))
        if k is not None:
            alternatives["knee"] = _choice(k, confirmed)
    binding = _binding(chosen, done, budgets, max_drop) if chosen and feasible else []
    return Recommendation(
        study_name=study.study_name, storage=storage, spec=spec, baseline=baseline, baseline_confirm=bconf,
        chosen=chosen, feasible=feasible, alternatives=alternatives, front=front, closest=closest,
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


def render(rec: Recommendation) -> Group:
    parts: list[Any] = []
    spec = rec.spec
    budgets, md = rec.budgets, rec.max_drop
    head = Text()
    head.append(f"{spec.get('model', '?')} on {spec.get('dataset', '?')}", style="bold")
    head.append(f" — max drop {md.describe()}; budgets: " + ", ".join(b.describe() for b in budgets))
    parts.append(head)
    c = rec.chosen
    if c is None:
        parts.append(Panel(Text("No candidate finished yet: no recommendation.", style="bold red")))
    else:
        e = c.best
        status = ("[bold green]FEASIBLE[/]" if rec.feasible else "[bold red]NOT FEASIBLE[/]")
        if rec.feasible and rec.uncertain():
            status += " [yellow](uncertain: the drop's 95% interval crosses the tolerance)[/]"
        title = f"Recommended recipe (trial {c.trial}{', preset ' + c.preset if c.preset else ''}) {status}"
        t = Table(box=box.SIMPLE_HEAVY, show_edge=False)
        t.add_column("")
        t.add_column("baseline", justify="right")
        t.add_column("recommended", justify="right")
        t.add_column("change", justify="right")
        b = rec.baseline_confirm if c.confirmed is not None and rec.baseline_confirm else rec.baseline
        t.add_row("accuracy (95% CI)", _fmt_acc(b), _fmt_acc(e), "drop " + _fmt_drop(e))
        if c.confirmed is not None:
            t.add_row("  at search fidelity", _fmt_acc(rec.baseline), _fmt_acc(c.proxy), "drop " + _fmt_drop(c.proxy))
        bc = rec.baseline.costs if rec.baseline else {}
        for key, label, unit in COST_ROWS:
            nv = e.costs.get(key) if e.costs.get(key) is not None else c.proxy.costs.get(key)
            t.add_row(label, format_quantity(bc.get(key), unit), format_quantity(nv, unit), _factor(bc.get(key), nv))
        body = [Text(c.recipe.describe(), style="bold cyan"), t]
        notes = list(e.notes or [])
        if c.recipe.quant.scheme.startswith("int8"):
            notes.append("int8 changes size and latency, not the multiply-accumulate count (MFLOPs).")
        if c.recipe.prune.method == "unstructured-l1" and c.recipe.prune.active:
            notes.append("unstructured pruning zeroes weights: params and dense size stay, non-zero "
                         "params and the sparse encoding fall.")
        if rec.binding:
            notes.append("what bound the answer: " + "; ".join(rec.binding))
        for n in notes:
            body.append(Text("• " + n, style="dim"))
        parts.append(Panel(Group(*body), title=title, title_align="left"))
    if not rec.feasible and rec.closest:
        parts.append(Text("Nothing met every constraint. Closest candidates:", style="bold red"))
    rows = rec.front or rec.closest
    if rows:
        t = Table(title="Feasible Pareto front (accuracy vs primary cost)" if rec.front else "Closest candidates",
                  box=box.SIMPLE, title_justify="left")
        for col in ("trial", "accuracy", "drop pp", "confirmed", "params", "MFLOPs", "MB", "ms"):
            t.add_column(col, justify="right", no_wrap=True)
        t.add_column("recipe", justify="left", overflow="fold", ratio=1, min_width=30)
        for ch in rows:
            e = ch.proxy
            t.add_row(str(ch.trial) + (" *" if rec.chosen and ch.trial == rec.chosen.trial else ""),
                      f"{100 * (e.accuracy or 0):.2f}%",
                      f"{e.drop_pp:+.2f}" if e.drop_pp is not None else "n/a",
                      f"{ch.confirmed.drop_pp:+.2f}" if ch.confirmed and ch.confirmed.drop_pp is not None else "",
                      format_quantity(e.costs.get("params"), "params").replace(" params", ""),
                      f"{e.costs.get('mflops'):.1f}" if e.costs.get("mflops") is not None else "n/a",
                      f"{e.costs.get('size_mb'):.2f}" if e.costs.get("size_mb") is not None else "n/a",
                      f"{e.costs.get('latency_ms'):.1f}" if e.costs.get("latency_ms") is not None else "n/a",
                      (ch.preset + ": " if ch.preset else "") + ch.recipe.describe())
        parts.append(t)
    if rec.alternatives:
        lines = [f"{name}: trial {ch.trial} — {ch.recipe.describe()} — {100 * (ch.proxy.accuracy or 0):.2f}%, "
                 + format_quantity(ch.proxy.costs.get(budgets[0].cost_field) if budgets else None,
                                   budgets[0].unit if budgets else "")
                 for name, ch in rec.alternatives.items()]
        parts.append(Panel("\n".join(lines), title="Alternatives", title_align="left"))
    n = rec.counts
    summary = (f"{n.get('finished', 0)} trials: {n.get('feasible', 0)} feasible, {n.get('infeasible', 0)} infeasible, "
               f"{n.get('pruned', 0)} skipped before training, {n.get('failed', 0)} failed; "
               f"{n.get('confirmed', 0)} re-checked at the confirm fidelity.")
    parts.append(Text(summary))
    if rec.infeasible_reasons:
        parts.append(Text("Why candidates were infeasible: " + "; ".join(
            f"{k} ({v})" for k, v in sorted(rec.infeasible_reasons.items(), key=lambda kv: -kv[1])), style="dim"))
    if rec.failures:
        parts.append(Text("Failures: " + "; ".join(f"{k} ({v})" for k, v in rec.failures.items()), style="dim"))
    for obj, imp in rec.importances.items():
        top = sorted(imp.items(), key=lambda kv: -kv[1])[:5]
        parts.append(Text(f"What mattered for {obj}: " + ", ".join(f"{k} {v:.2f}" for k, v in top), style="dim"))
    return Group(*parts)


def markdown(rec: Recommendation) -> str:
    """The explanation as Markdown (the dashboard note, ``studies/<study>/report.md``)."""
    d = rec.to_dict()
    lines = [f"# Recommendation for {rec.spec.get('model')} on {rec.spec.get('dataset')}", ""]
    lines.append(f"Max drop {rec.max_drop.describe()}; budgets: " + ", ".join(b.describe() for b in rec.budgets))
    lines.append("")
    r = d["recommended"]
    if r is None:
        lines.append("**No candidate finished yet.**")
    else:
        state = "feasible" if rec.feasible else "NOT feasible"
        if r.get("uncertain"):
            state += " (uncertain: the drop interval crosses the tolerance)"
        lines += [f"**Recommended** (trial {r['trial']}, {state}): `{r['describe']}`", "",
                  "| | baseline | recommended |", "|---|---:|---:|"]
        b = d["baseline"] or {}
        acc = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"  # noqa: E731
        lines.append(f"| accuracy | {acc(b.get('accuracy'))} | {acc(r['accuracy'])} |")
        lines.append(f"| drop (pp) | | {r['drop']:+.2f} [{r['drop_interval'][0]:+.1f}, {r['drop_interval'][1]:+.1f}] |"
                     if r["drop"] is not None else "| drop | | n/a |")
        for key, label, unit in COST_ROWS:
            lines.append(f"| {label} | {format_quantity(b.get(key), unit)} | {format_quantity(r.get(key), unit)} |")
    lines += ["", "## Feasible Pareto front", "", "| trial | recipe | accuracy | drop (pp) | params | MFLOPs | MB | ms |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for p in d["pareto"]:
        lines.append(f"| {p['trial']} | {p['describe']} | {100 * (p['proxy_accuracy'] or 0):.2f}% | "
                     f"{(p['proxy_drop'] or 0):+.2f} | {p['params']} | {p['mflops'] and round(p['mflops'], 1)} | "
                     f"{p['size_mb'] and round(p['size_mb'], 2)} | {p['latency_ms'] and round(p['latency_ms'], 1)} |")
    n = rec.counts
    lines += ["", f"{n.get('finished', 0)} trials: {n.get('feasible', 0)} feasible, {n.get('infeasible', 0)} "
              f"infeasible, {n.get('pruned', 0)} skipped before training, {n.get('failed', 0)} failed."]
    if rec.binding:
        lines.append("What bound the answer: " + "; ".join(rec.binding))
    return "\n".join(lines) + "\n"
