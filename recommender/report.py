"""The answer as people and programs read it: the explanation (rich), ``report.md``, ``report.json``
and ``rec.pareto``.

Everything here renders one :class:`~recommender.ledger.Ledger` and its
:class:`~recommender.ledger.Answer`: every number shown is a candidate's measurement at the rung
that decided it, beside that rung's baseline, so the terminal, the files, the plot
(:mod:`recommender.plot`) and the exit code cannot disagree. Everything is read back from the
study's storage, so ``recommend show STUDY`` renders the same answer later, on another machine,
or while workers are still running.
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
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .constraints import Budget, MaxDrop, format_quantity
from .evaluation import Baseline, Evaluation
from .ledger import Answer, Entry, Ledger, Measurement
from .question import Question
from .recipe import Recipe
from .search.objective import SENSITIVITY_ATTR
from .search.recovery import SKIPPED_ATTR, counted_trials, is_interrupted

COST_ROWS = (  # (Costs field, label, unit)
    ("params", "params", "params"),
    ("nonzero_params", "non-zero params", "params"),
    ("mflops", "MFLOPs", "MFLOPs"),
    ("size_mb", "size (dense)", "MB"),
    ("sparse_size_mb", "size (sparse)", "MB"),
    ("latency_ms", "latency (batch 1)", "ms"),
    ("latency_ort_ms", "latency in ONNX Runtime (batch 1)", "ms"),
    ("latency_predicted_ms", "latency on the profiled device (predicted, batch 1)", "ms"),
)
#: Rows shown only when the study measured them (a -ort budget, a profile's prediction).
OPTIONAL_COST_ROWS = ("latency_ort_ms", "latency_predicted_ms")

#: Parameter importances are shown once the study has this many evaluated candidates (fewer
#: trials sharing each parameter give importances that are noise).
MIN_TRIALS_FOR_IMPORTANCES = 10


# -- reading trials ----------------------------------------------------------------------------

def completed(study: optuna.Study) -> list[FrozenTrial]:
    """The study's completed trials that carry an evaluation (rung 0)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "evaluation" in t.user_attrs and t.values is not None]


def trial_counts(study: optuna.Study, ledger: Ledger) -> dict[str, int]:
    """How many trials did what: finished (evaluated, skipped, failed, interrupted), running,
    chosen by the sampler, promoted; feasible/infeasible at the search rung by the ledger's
    verdicts."""
    all_trials = study.get_trials(deepcopy=False)
    search = [(e, e.search) for e in ledger.entries if e.search is not None]
    feasible = sum(m.verdict.holds for _, m in search)
    return {
        "finished": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in all_trials),
        "evaluated": len(search), "complete": len(search), "feasible": feasible, "infeasible": len(search) - feasible,
        "pruned": sum(t.state == TrialState.PRUNED for t in all_trials)
        + sum(bool(t.user_attrs.get(SKIPPED_ATTR)) for t in all_trials if t.state == TrialState.COMPLETE),
        "failed": sum(t.state == TrialState.FAIL and not is_interrupted(t) for t in all_trials),
        "interrupted": sum(is_interrupted(t) for t in all_trials),
        "running": sum(t.state == TrialState.RUNNING for t in all_trials),
        "sampled": sum(1 for e, _ in search if not e.preset),
        "confirmed": sum(1 for e in ledger.entries if e.top_measured > 0),
        "counted": len(counted_trials(study)),
        "baseline_evaluations": int(study.user_attrs.get("baseline_evaluations", 0)),
    }


# -- the recommendation -----------------------------------------------------------------------

@dataclass
class Recommendation:
    """The study's answer: its ledger of evidence and what it decides.

    ``recipe``/``evaluation`` are the recommended candidate's at the rung that decided it (None
    when nothing is feasible); ``baseline`` is that rung's baseline; ``feasible`` decides the
    CLI's exit code (0 / 1).
    """

    study_name: str
    storage: str
    ledger: Ledger
    spec: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    warm_start_skipped: dict[str, str] = field(default_factory=dict)
    space_note: str = ""
    #: the study's plan as stored (rungs, trials asked, ``note``) and why the search stopped short
    plan: dict[str, Any] = field(default_factory=dict)
    search_stopped: str | None = None
    #: the search stopped because no draft fitted the budgets (``budget_unreachable`` study
    #: attribute, :mod:`recommender.search.floor`): the floor per budget and the closest drafts
    budget_unreachable: dict[str, Any] = field(default_factory=dict)
    #: the trained baseline's per-layer sensitivity summaries (``prune`` / ``int8``), when a
    #: candidate measured them (:data:`recommender.search.objective.SENSITIVITY_ATTR`)
    layers_that_matter: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    importances: dict[str, dict[str, float]] = field(default_factory=dict)
    study: optuna.Study | None = None
    #: files written for this answer by :func:`recommender.api.write_outputs` (name -> path);
    #: ``recipe`` only when the answer is feasible.
    files: dict[str, str] = field(default_factory=dict)
    #: the question as :func:`recommender.recommend` parsed it (None when read with ``show``)
    source_spec: Any = None

    # -- the answer ----------------------------------------------------------------------------
    @property
    def answer(self) -> Answer:
        return self.ledger.answer()

    @property
    def question(self) -> Question:
        return self.ledger.question

    @property
    def chosen(self) -> Entry | None:
        return self.answer.chosen

    @property
    def feasible(self) -> bool:
        return self.answer.feasible

    @property
    def rung(self) -> int:
        """The rung whose evidence decides the answer."""
        return self.answer.rung

    @property
    def recipe(self) -> Recipe | None:
        return self.chosen.recipe if self.chosen else None

    @property
    def evaluation(self) -> Evaluation | None:
        """The recommended candidate's evaluation at the rung that decided it."""
        d = self.chosen.deciding if self.chosen else None
        return d.evaluation if d else None

    @property
    def baseline(self) -> Baseline | None:
        """The baseline of the rung that decides the answer (what its drop is measured against)."""
        return self.ledger.baseline(self.rung)

    def baseline_at(self, rung: int) -> Baseline | None:
        return self.ledger.baseline(rung)

    @property
    def max_drop(self) -> MaxDrop:
        return self.question.max_drop

    @property
    def budgets(self) -> list[Budget]:
        return list(self.question.budgets)

    @property
    def front(self) -> tuple[Entry, ...]:
        return self.answer.front

    @property
    def closest(self) -> tuple[Entry, ...]:
        return self.answer.closest

    @property
    def alternatives(self) -> dict[str, Entry]:
        return dict(self.answer.alternatives)

    def uncertain(self) -> bool:
        """The data do not settle the answer (its reasons: ``answer.uncertain``)."""
        return bool(self.answer.uncertain) and self.chosen is not None

    @property
    def infeasible_reasons(self) -> dict[str, int]:
        """What the candidates missed at the rung that decided them, and why trials were skipped."""
        names = ["max drop"] + [b.describe() for b in self.budgets]
        out: Counter[str] = Counter()
        for e in self.ledger.entries:
            d = e.deciding
            if d is None or d.verdict.holds:
                continue
            for miss in d.verdict.misses:
                out[names[0] if miss.startswith("drop") else next(
                    (n for b, n in zip(self.budgets, names[1:]) if miss.startswith(b.metric + " ")), miss)] += 1
        if self.study is not None:
            for t in self.study.get_trials(deepcopy=False):
                r = t.user_attrs.get("pruned_reason") if t.state == TrialState.PRUNED else t.user_attrs.get(SKIPPED_ATTR)
                if r:
                    # "structure breaks the budget before training: params <= 5M best case ..." -> its head
                    head, _, tail = str(r).partition(":")
                    out[f"{head}: {tail.split(' best case')[0].strip()}" if tail.strip() else head] += 1
        return dict(out)

    @property
    def binding(self) -> list[str]:
        """Constraints that stopped a cheaper candidate: what a user would relax to get more."""
        c = self.chosen
        if c is None or not self.budgets:
            return []
        p = self.budgets[0]
        hits: Counter[str] = Counter()
        for e in self.ledger.entries:
            d = e.deciding
            if d is None or d.verdict.holds or e.cost(p) >= c.cost(p):
                continue
            for miss in d.verdict.misses:
                hits["max drop" if miss.startswith("drop") else miss.split(" ")[0]] += 1
        return [f"{name} (stopped {n} cheaper candidate{'s' if n != 1 else ''})" for name, n in hits.most_common()]

    @property
    def pareto(self) -> pd.DataFrame:
        """The candidates that held (the front; each at the rung that decided it): one row per
        recipe, accuracy in %, drop in pp, costs in their units."""
        rows = []
        for e in self.front:
            d = entry_dict(self.ledger, e)
            rows.append({"trial": d["trial"], "recipe": d["describe"], "preset": d["preset"], "rung": d["rung"],
                         "accuracy_pct": _pct(d["accuracy"]), "baseline_pct": _pct(d["baseline_accuracy"]),
                         "drop_pp": d["drop"], "drop_high_pp": d["drop_interval"][1], "evidence": d["evidence_text"],
                         **{k: d.get(k) for k, _, _ in COST_ROWS}})
        return pd.DataFrame(rows)

    def load_model(self, *, return_evaluation: bool = False, log: Any = None, progress: Any = None) -> Any:
        """The recommended model as recommended: compressed, with the weights its answer was
        measured with (from the weights cache, or trained once), at the rung that decided it
        (:func:`recommender.api.recommended_model`). With ``return_evaluation``, also its
        evaluation measured again: ``(model, evaluation)``."""
        from .api import recommended_model

        model, evaluation = recommended_model(self, log=log, progress=progress)
        return (model, evaluation) if return_evaluation else model

    def build_architecture(self, num_classes: int | None = None):
        """The recommended architecture only: untrained, uncompressed (fp32); what
        ``recommend apply`` trains, prunes and quantizes. For the model as recommended, see
        :meth:`load_model`."""
        from .models import build_model

        if self.recipe is None:
            raise ValueError("nothing feasible was found: no recipe to build")
        nc = num_classes or self.question.num_classes or self.spec.get("num_classes") or 10
        return build_model(self.question.model, self.recipe.arch, num_classes=nc)

    def run_lines(self) -> list[str]:
        """What the run did not do that was asked, and why: the trial target not reached, no
        promotion rung (``--rungs auto``), rungs skipped."""
        out = []
        target, counted = self.plan.get("trials"), self.counts.get("counted")
        if target and counted is not None and counted < target and not self.counts.get("running"):
            why = self.search_stopped or "the search stopped early"
            out.append(f"Searched {counted} of the {target} trials asked (--trials): {why}; the same command "
                       "resumes the study and runs the rest.")
        if self.plan.get("note"):
            out.append(self.plan["note"][0].upper() + self.plan["note"][1:] + ".")
        for info in self.ledger.rungs[1:]:
            if info.skipped:
                out.append(f"Rung {info.index} ({info.label}) not run: {info.skipped}.")
        return out

    def warning(self, e: Entry) -> str | None:
        """A warning when the drop grew with fidelity (the cheap rung flattered the candidate)."""
        g = e.drop_growth()
        base = self.ledger.baseline(e.rung)
        if g is None or base is None:
            return None
        if g > max(1.0, 0.5 * self.max_drop.allowed_pp(base.accuracy)):
            return (f"trial {e.trial}: its drop grew by {g:+.1f} pp from the search rung to rung {e.rung}: "
                    "the cheap rung flattered it; full training may show a larger drop still")
        return None

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``report.json``: the question, every rung with its baseline and power, the answer at
        its deciding rung with its evidence on every rung, the front, alternatives, closest
        candidates and every candidate's evidence."""
        led, ans = self.ledger, self.answer
        rec = None
        if ans.chosen is not None:
            rec = entry_dict(led, ans.chosen, notes=answer_notes(self), warning=self.warning(ans.chosen))
            rec.update(feasible=ans.feasible, uncertain=self.uncertain(), uncertain_reasons=list(ans.uncertain))
        base = led.baseline(ans.rung)
        return {
            "study": {"name": self.study_name, "storage": self.storage, "n_trials": self.counts.get("finished", 0),
                      **self.counts},
            "spec": self.spec,
            "question": self.question.to_dict(),
            "feasible": ans.feasible,
            "uncertain": self.uncertain(),
            "uncertain_reasons": list(ans.uncertain),
            "gate": list(ans.gate),
            "answer_rung": ans.rung,
            "baseline": None if base is None else {"rung": ans.rung, **baseline_dict(base)},
            "recommended": rec,
            "power": ans.power.to_dict() if ans.power else None,
            "rungs": [rung_dict(led, r.index) for r in led.rungs],
            "warm_start_skipped": self.warm_start_skipped,
            "space_note": self.space_note,
            "budget_unreachable": self.budget_unreachable,
            "layers_that_matter": self.layers_that_matter,
            "alternatives": {k: entry_dict(led, v) for k, v in ans.alternatives.items()},
            "pareto": [entry_dict(led, e) for e in ans.front],
            "closest_infeasible": [entry_dict(led, e) for e in ans.closest],
            "candidates": [entry_dict(led, e, brief=True) for e in led.entries],
            "infeasible_reasons": self.infeasible_reasons,
            "failures": self.failures,
            "importances": self.importances,
            "binding_constraints": self.binding,
            "plan": self.plan,
            "run": self.run_lines(),
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


# -- the answer as data (report.json; read by the Markdown and the plot) ------------------------

def baseline_dict(b: Baseline) -> dict[str, Any]:
    return {"accuracy": b.accuracy, "accuracy_interval": [b.acc_low, b.acc_high], "source": b.source,
            "fidelity": b.fidelity, "n_val": None if b.correct is None else int(len(b.correct)),
            **{k: b.costs.get(k) for k, _, _ in COST_ROWS}}


def rung_dict(led: Ledger, k: int) -> dict[str, Any]:
    r = led.rung(k)
    power = led.power(k)
    return {"index": k, "label": led.label(k),
            "baseline": None if r is None or r.baseline is None else baseline_dict(r.baseline),
            "promoted": None if r is None or r.promoted is None else list(r.promoted),
            "skipped": None if r is None else r.skipped,
            "measured": len(led.measured_at(k)), "power": power.to_dict() if power else None}


def measurement_dict(m: Measurement) -> dict[str, Any]:
    e = m.evaluation
    return {"rung": m.rung, "label": m.label, "fidelity": e.fidelity, "ok": m.ok, "reason": e.reason or None,
            "baseline_accuracy": m.baseline.accuracy if m.baseline else None,
            "accuracy": e.accuracy, "accuracy_interval": [e.acc_low, e.acc_high],
            "drop": e.drop_pp, "drop_interval": [e.drop_low_pp, e.drop_high_pp],
            "holds": m.verdict.holds, "misses": list(m.verdict.misses), "uncertain": list(m.verdict.uncertain)}


def entry_dict(led: Ledger, e: Entry, *, notes: list[str] | None = None, warning: str | None = None,
               brief: bool = False) -> dict[str, Any]:
    """A candidate at the rung that decided it, with its evidence on every rung it ran."""
    d = e.deciding or e.measurements[-1]
    ev = d.evaluation
    s = e.search
    status = "held" if e.held else "failed" if e.deciding is None else "refuted" if e.rung > 0 else "missed"
    out: dict[str, Any] = {
        "trial": e.trial, "preset": e.preset, "describe": e.recipe.describe(), "status": status,
        "rung": d.rung, "label": d.label, "accuracy": ev.accuracy, "accuracy_interval": [ev.acc_low, ev.acc_high],
        "baseline_accuracy": d.baseline.accuracy if d.baseline else None,
        "drop": ev.drop_pp, "drop_interval": [ev.drop_low_pp, ev.drop_high_pp], "prob_within": ev.prob_within,
        "fidelity": ev.fidelity, "holds": d.verdict.holds, "misses": list(d.verdict.misses),
        "proxy_accuracy": s.evaluation.accuracy if s else None, "proxy_drop": s.evaluation.drop_pp if s else None,
        "confirmed": e.held and e.rung > 0, "evidence_text": e.evidence(),
        **{k: e.costs.get(k) for k, _, _ in COST_ROWS},
    }
    if brief:
        out["evidence"] = [{k: v for k, v in measurement_dict(m).items()
                            if k in ("rung", "ok", "accuracy", "drop", "holds", "misses")} for m in e.measurements]
        return out
    out.update(recipe=e.recipe.to_dict(), rungs=[measurement_dict(m) for m in e.measurements],
               peak_memory_mb=e.costs.get("peak_memory_mb"), notes=list(ev.notes or []) if notes is None else notes,
               warning=warning)
    return out


def answer_notes(rec: Recommendation) -> list[str]:
    """What the recommended candidate's numbers mean, beyond the table (one sentence each)."""
    c = rec.chosen
    if c is None:
        return []
    d = c.deciding
    notes = list(d.evaluation.notes or []) if d else []
    warn = rec.warning(c)
    if warn:
        notes.insert(0, "WARNING: " + warn)
    if c.recipe.quant.active and "flops" not in _lowers(c.recipe.quant):
        notes.append(f"{c.recipe.quant.method} changes size and latency, not the multiply-accumulate count (MFLOPs).")
    base0 = rec.ledger.baseline(0)
    source = base0.source if base0 is not None else None
    if c.recipe.prune.active and c.rung == 0 and source == "trained":
        notes.append("the pruning drop is measured from the baseline as this rung trains it, briefly: "
                     "against long-trained references such drops were several pp off, both ways "
                     "(overstated on digits, understated on cifar10-mini; docs/measurements.md). "
                     "A higher rung measures it from a longer-trained baseline, --checkpoint "
                     "from your trained model.")
    if c.recipe.prune.active and source == "checkpoint":
        notes.append("the pruning drop is measured from your checkpoint after the rung's short recovery "
                     "fine-tune and a BN re-estimation: from the same trained weights, such drops were "
                     "0.0-2.4 pp above a 2-epoch fine-tune's on digits (mean 0.9 pp; 2.4 pp within "
                     "on cifar10-mini, measured before the BN re-estimation; docs/measurements.md); "
                     "fine-tune the pruned network before you ship it.")
    if c.recipe.prune.active and "params" not in _lowers(c.recipe.prune):
        notes.append(f"{c.recipe.prune.method} zeroes weights: params and dense size stay, non-zero "
                     "params and the sparse encoding fall.")
    if rec.binding:
        notes.append("what bound the answer: " + "; ".join(rec.binding))
    return notes


def layers_lines(layers: dict[str, Any]) -> list[str]:
    """The layers that matter, one sentence per kind of compression, each naming what its figures
    are measured on (training images of the trained baseline, never the validation set)."""
    out = []
    p = layers.get("prune")
    if p and p.get("layers"):
        worst = ", ".join(f"{x['layer']} ({x['drop_pp']:+.1f} pp)" for x in p["layers"])
        out.append(f"Layers that matter for pruning (the trained baseline, {p.get('images', 0)} training images after "
                   f"BN re-estimation on {p.get('calib_images', 0)}; accuracy drop with {100 * p['ratio']:.0f}% of one "
                   f"group's channels removed, of {p.get('groups', 0)} groups): {worst}.")
    q = layers.get("int8")
    if q and q.get("layers"):
        def one(x: dict[str, Any]) -> str:
            if x.get("loss_delta") is None:
                return x["layer"]
            return f"{x['layer']} ({x['loss_delta']:+.3f} nats/image, {x['drop_pp']:+.1f} pp)"
        how = ("weight error only, no data" if q.get("method") == "weight-mse" else
               f"each layer alone in int8, {q.get('images', 0)} training images")
        out.append(f"Layers that matter for int8 ({how}, {q.get('observer')} observer, "
                   f"{'per-channel' if q.get('per_channel') else 'per-tensor'} weights, of {q.get('layers_measured', 0)} "
                   f"layers; kept in float first by keep_float): " + ", ".join(one(x) for x in q["layers"]) + ".")
    return out


def recommendation_from_study(study: optuna.Study, storage: str = "") -> Recommendation:
    """The answer, read back from what the study stored (its question, every rung's baseline,
    every candidate's evaluations): :meth:`recommender.ledger.Ledger.from_study`."""
    attrs = study.user_attrs
    ledger = Ledger.from_study(study)
    all_trials = study.get_trials(deepcopy=False)
    failures: Counter[str] = Counter(t.user_attrs.get("fail_reason", "stale or interrupted trial")
                                     for t in all_trials if t.state == TrialState.FAIL)
    return Recommendation(
        study_name=study.study_name, storage=storage, ledger=ledger, spec=dict(attrs.get("spec", {})),
        counts=trial_counts(study, ledger), warm_start_skipped=dict(attrs.get("warm_start_skipped", {})),
        space_note=str(attrs.get("space_note") or ""), plan=dict(attrs.get("plan") or {}),
        search_stopped=attrs.get("search_stopped"), budget_unreachable=dict(attrs.get("budget_unreachable") or {}),
        layers_that_matter=dict(attrs.get(SENSITIVITY_ATTR) or {}),
        failures=dict(failures),
        importances=_importances(study), study=study)


def _importances(study: optuna.Study) -> dict[str, dict[str, float]]:
    """fANOVA-free, fast importances (mean decrease impurity) for both objectives, once the
    study has :data:`MIN_TRIALS_FOR_IMPORTANCES` evaluated candidates."""
    done = completed(study)
    if len(done) < MIN_TRIALS_FOR_IMPORTANCES:
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

def _fmt_acc(acc: float | None, lo: float | None = None, hi: float | None = None) -> str:
    if acc is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{100 * acc:.2f}%"
    return f"{100 * acc:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _fmt_drop(drop: float | None, lo: float | None = None, hi: float | None = None) -> str:
    if drop is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{drop:+.2f} pp"
    return f"{drop:+.2f} pp [{lo:+.1f}, {hi:+.1f}]"


def _factor(base: Any, new: Any) -> str:
    """``4.0x smaller`` or ``1.5x larger`` (never ``0.3x smaller``); empty when unknown."""
    try:
        b, n = float(base), float(new)
    except (TypeError, ValueError):
        return ""
    if not (b > 0 and n > 0):
        return ""
    if math.isclose(b, n, rel_tol=0.005):
        return "same"
    return f"{b / n:.1f}x smaller" if b > n else f"{n / b:.1f}x larger"


def status_line(rec: Recommendation) -> str:
    """``FEASIBLE at rung 1 (label)``, with ``uncertain`` when the data do not settle it."""
    c = rec.chosen
    if c is None:
        return "NOTHING FEASIBLE"
    head = f"{'FEASIBLE' if rec.feasible else 'NOT FEASIBLE'} at rung {c.rung} ({rec.ledger.label(c.rung)})"
    return head + (" — uncertain" if rec.uncertain() else "")


def _evidence_table(rec: Recommendation, e: Entry) -> Table:
    t = Table(box=box.SIMPLE, title="Evidence on every rung it ran", title_justify="left")
    for col in ("rung", "baseline", "candidate", "drop pp", "95% CI", "verdict"):
        t.add_column(col, justify="right", no_wrap=True)
    for m in e.measurements:
        ev = m.evaluation
        base = m.baseline
        verdict = "failed" if not m.ok else "held" if m.verdict.holds else "missed"
        ci = f"[{ev.drop_low_pp:+.1f}, {ev.drop_high_pp:+.1f}]" if ev.drop_low_pp is not None else ""
        t.add_row(f"{m.rung}", _fmt_acc(base.accuracy) if base else "n/a",
                  _fmt_acc(ev.accuracy) if m.ok else (ev.reason or "failed")[:24],
                  f"{ev.drop_pp:+.2f}" if ev.drop_pp is not None else "n/a", ci, verdict)
    return t


def _candidate_table(rec: Recommendation, rows: tuple[Entry, ...], title: str) -> Table:
    t = Table(title=title, box=box.SIMPLE, title_justify="left",
              caption="evidence: per rung, ✓ held, ✗ missed, ! failed; * the recommendation", caption_justify="left")
    p = rec.budgets[0] if rec.budgets else None
    cols = ("trial", "rung", "accuracy", "drop pp", p.metric if p else "cost", "evidence")
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("recipe", justify="left", overflow="fold", ratio=1, min_width=20)
    for e in rows:
        d = e.deciding or e.measurements[-1]
        ev = d.evaluation
        mark = " *" if rec.chosen is not None and e.trial == rec.chosen.trial else ""
        cost = format_quantity(p.value(e.costs), p.unit).replace(" params", "") if p else ""
        t.add_row(f"{e.trial}{mark}", str(d.rung), _fmt_acc(ev.accuracy), f"{ev.drop_pp:+.2f}" if ev.drop_pp is not None
                  else "n/a", cost, e.evidence(), escape((e.preset + ": " if e.preset else "") + e.recipe.describe()))
    return t


def render(rec: Recommendation) -> Group:
    """The explanation (rich): the first lines say what limits trust in the answer, then the
    answer at the rung that decided it, its evidence, the front, alternatives and counts."""
    parts: list[Any] = []
    ans, led = rec.answer, rec.ledger
    for g in ans.gate:
        parts.append(Text(g, style="bold yellow"))
    q = rec.question
    head = Text()
    head.append(f"{q.model} on {q.dataset}", style="bold")
    head.append(f" — max drop {q.max_drop.describe()}; budgets: " + ", ".join(b.describe() for b in q.budgets))
    parts.append(head)
    if rec.space_note:
        parts.append(Text(rec.space_note, style="dim"))
    if rec.budget_unreachable.get("line"):
        parts.append(Text(rec.budget_unreachable["line"], style="bold red"))
    c = ans.chosen
    if c is None and not rec.counts.get("finished"):
        parts.append(Panel(Text("No candidate finished yet: no recommendation.", style="bold red")))
    elif c is not None:
        d = c.deciding
        ev = d.evaluation
        base = d.baseline
        status = Text(status_line(rec), style="bold green" if rec.feasible and not rec.uncertain() else "bold yellow")
        body: list[Any] = [status, Text(c.recipe.describe(), style="bold cyan")]
        for why in ans.uncertain:
            if why not in ans.gate:
                body.append(Text("uncertain: " + why, style="yellow"))
        t = Table(box=box.SIMPLE_HEAVY, show_edge=False)
        t.add_column("")
        t.add_column(f"baseline r{d.rung}", justify="right", no_wrap=True)
        t.add_column("recommended", justify="right", no_wrap=True)
        t.add_column("change", justify="right", no_wrap=True)
        t.add_row("accuracy", _fmt_acc(base.accuracy) if base else "n/a", _fmt_acc(ev.accuracy),
                  "drop " + _fmt_drop(ev.drop_pp))
        t.add_row("  95% interval", f"[{100 * base.acc_low:.1f}, {100 * base.acc_high:.1f}]" if base else "",
                  f"[{100 * ev.acc_low:.1f}, {100 * ev.acc_high:.1f}]" if ev.acc_low is not None else "",
                  f"[{ev.drop_low_pp:+.1f}, {ev.drop_high_pp:+.1f}] pp" if ev.drop_low_pp is not None else "")
        b0 = led.baseline(0)
        bc = (b0 or base).costs if (b0 or base) else {}
        for key, label, unit in COST_ROWS:
            nv = c.costs.get(key)
            if key in OPTIONAL_COST_ROWS and nv is None and bc.get(key) is None:
                continue
            t.add_row(label, format_quantity(bc.get(key), unit), format_quantity(nv, unit), _factor(bc.get(key), nv))
        body.append(t)
        if len(led.rungs) > 1 or len(c.measurements) > 1:
            body.append(_evidence_table(rec, c))
        for n in answer_notes(rec):
            body.append(Text("• " + n, style="yellow" if n.startswith("WARNING") else "dim"))
        title = f"Recommended: trial {c.trial}" + (f" ({c.preset})" if c.preset else "")
        parts.append(Panel(Group(*body), title=escape(title), title_align="left"))
    note = nothing_feasible_note(rec)
    if note:
        parts.append(Text(note + (" Closest candidates (what they miss):" if ans.closest else ""), style="bold red"))
        for e in ans.closest:
            dd = e.deciding
            ev = dd.evaluation
            parts.append(Text(f"  trial {e.trial} (rung {dd.rung}): {e.recipe.describe()} — "
                              f"{_fmt_acc(ev.accuracy, ev.acc_low, ev.acc_high)}, drop "
                              f"{_fmt_drop(ev.drop_pp, ev.drop_low_pp, ev.drop_high_pp)}; misses: "
                              f"{'; '.join(dd.verdict.misses) or 'nothing'}"))
    if ans.front:
        parts.append(_candidate_table(rec, ans.front, "Candidates that held (each at its deciding rung)"))
    elif ans.closest:
        parts.append(_candidate_table(rec, ans.closest, "Closest candidates"))
    if ans.alternatives:
        p = rec.budgets[0] if rec.budgets else None
        lines = []
        for name, e in ans.alternatives.items():
            dd = e.deciding
            lines.append(f"{name}: trial {e.trial} — {e.recipe.describe()} — {_fmt_acc(dd.accuracy)} at rung {dd.rung}"
                         f" (drop {_fmt_drop(dd.drop)}), " + (format_quantity(p.value(e.costs), p.unit) if p else ""))
        parts.append(Panel(escape("\n".join(lines)), title="Alternatives", title_align="left"))
    parts.append(Text(summary_line(rec.counts, len(led.rungs))))
    for line in rec.run_lines():
        parts.append(Text(line, style="yellow"))
    if rec.warm_start_skipped:
        parts.append(Text(skipped_presets_line(rec.warm_start_skipped), style="dim"))
    reasons = rec.infeasible_reasons
    if reasons:
        parts.append(Text("Why candidates were infeasible or skipped: " + "; ".join(
            f"{k} ({v})" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])), style="dim"))
    if rec.failures:
        parts.append(Text("Failures: " + "; ".join(f"{k} ({v})" for k, v in rec.failures.items()), style="dim"))
    for obj, imp in rec.importances.items():
        top = sorted(imp.items(), key=lambda kv: -kv[1])[:5]
        parts.append(Text(f"What mattered for {obj}: " + ", ".join(f"{k} {v:.2f}" for k, v in top), style="dim"))
    for line in layers_lines(rec.layers_that_matter):
        parts.append(Text(line, style="dim"))
    return Group(*parts)


def _lowers(cfg: Any) -> frozenset[str]:
    from .compress.methods import get_method

    return get_method(cfg.stage, cfg.method).lowers


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
    led = rec.ledger
    if any(m.verdict.holds for e in led.entries for m in e.measurements if m.ok):
        return ("Nothing feasible was found: every candidate that met the constraints at a lower rung missed them "
                "at the highest rung it was measured on; no recipe is recommended.")
    if not rec.closest:
        return ("Nothing feasible was found: no candidate was trained to the end (all were skipped or failed: "
                "reasons below); no recipe is recommended.")
    return "Nothing feasible was found: no candidate met every constraint; no recipe is recommended."


def _md(value: Any) -> str:
    """A Markdown table cell: ``|`` escaped (it would split the cell), no line breaks."""
    return " ".join(str(value).splitlines()).replace("|", "\\|")


def _md_row(*cells: Any) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"


def _md_acc(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _md_drop(x: float | None, interval: list | None = None) -> str:
    if x is None:
        return "n/a"
    if interval and interval[0] is not None and interval[1] is not None:
        return f"{x:+.2f} [{interval[0]:+.1f}, {interval[1]:+.1f}]"
    return f"{x:+.2f}"


def markdown(rec: Recommendation) -> str:
    """The explanation as Markdown (the dashboard note, ``studies/<study>/report.md``), written
    from :meth:`Recommendation.to_dict` (what ``report.json`` holds); every table cell is escaped."""
    d = rec.to_dict()
    q = rec.question
    lines = []
    for g in d["gate"]:
        lines += [f"**{g}**", ""]
    lines += [f"# Recommendation for {q.model} on {q.dataset}", ""]
    lines.append(f"Max drop {q.max_drop.describe()}; budgets: " + ", ".join(b.describe() for b in q.budgets))
    lines.append("")
    if rec.space_note:
        lines += [rec.space_note, ""]
    if rec.budget_unreachable.get("line"):
        lines += [f"**{rec.budget_unreachable['line']}**", ""]
    r = d["recommended"]
    if r is None and not rec.counts.get("finished"):
        lines.append("**No candidate finished yet.**")
    elif r is not None:
        lines += [f"**Recommended** (trial {r['trial']}): `{r['describe']}`", "", f"**{status_line(rec)}**", ""]
        for why in d["uncertain_reasons"]:
            if why not in d["gate"]:
                lines += [f"- uncertain: {why}"]
        if any(why not in d["gate"] for why in d["uncertain_reasons"]):
            lines.append("")
        b = d["baseline"] or {}
        b0 = (d["rungs"][0].get("baseline") if d["rungs"] else None) or b
        lines += [f"| | baseline (rung {r['rung']}) | recommended |", "|---|---:|---:|"]
        lines.append(_md_row("accuracy", _md_acc(b.get("accuracy")), _md_acc(r["accuracy"])))
        lines.append(_md_row("drop (pp)", "", _md_drop(r["drop"], r["drop_interval"])))
        for key, label, unit in COST_ROWS:
            lines.append(_md_row(label, format_quantity(b0.get(key), unit), format_quantity(r.get(key), unit)))
        lines.append("")
        if len(r["rungs"]) > 1 or len(d["rungs"]) > 1:
            lines += ["Evidence on every rung it ran (lowest fidelity first):", "",
                      "| rung | fidelity | baseline | accuracy | drop (pp) [95% CI] | verdict |",
                      "|---:|---|---:|---:|---:|---|"]
            for row in r["rungs"]:
                verdict = "failed" if not row["ok"] else "held" if row["holds"] else "missed"
                lines.append(_md_row(row["rung"], row["label"], _md_acc(row["baseline_accuracy"]),
                                     _md_acc(row["accuracy"]), _md_drop(row["drop"], row["drop_interval"]), verdict))
            lines.append("")
        for n in r.get("notes") or []:
            lines.append(f"- {n}")
        if r.get("notes"):
            lines.append("")
    note = nothing_feasible_note(rec)
    if note:
        lines += [f"**{note}**"]
    tables = [("Candidates that held (the front, each at the rung that decided it)", d["pareto"]),
              ("Closest candidates (infeasible)", d["closest_infeasible"])]
    for title, rows in tables:
        if not rows:
            continue
        extra = [k for k in OPTIONAL_COST_ROWS if any(p.get(k) is not None for p in rows)]
        heads = "".join({"latency_ort_ms": " ms (ONNX Runtime) |",
                         "latency_predicted_ms": " ms (predicted) |"}[k] for k in extra)
        lines += ["", f"## {title}", "",
                  "| trial | rung | recipe | accuracy | drop (pp) | evidence | params | MFLOPs | MB | ms |" + heads,
                  "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|" + "---:|" * len(extra)]
        for p in rows:
            lines.append(_md_row(p["trial"], p["rung"], p["describe"], _md_acc(p["accuracy"]), _md_drop(p["drop"]),
                                 p["evidence_text"], format_quantity(p["params"], "params").replace(" params", ""),
                                 _round(p["mflops"], 1), _round(p["size_mb"], 2), _round(p["latency_ms"], 1),
                                 *(_round(p.get(k), 1) for k in extra)))
    if d["alternatives"]:
        lines += ["", "## Alternatives", ""]
        for name, a in d["alternatives"].items():
            lines.append(f"- {name}: trial {a['trial']} — `{a['describe']}` — {_md_acc(a['accuracy'])} at rung "
                         f"{a['rung']} (drop {_md_drop(a['drop'])})")
    lines += ["", summary_line(rec.counts, len(rec.ledger.rungs))]
    for line in d["run"]:
        lines += ["", line]
    if rec.warm_start_skipped:
        lines += ["", skipped_presets_line(rec.warm_start_skipped)]
    if d["infeasible_reasons"]:
        lines.append("")
        lines.append("Why candidates were infeasible or skipped: " + "; ".join(
            f"{k} ({v})" for k, v in sorted(d["infeasible_reasons"].items(), key=lambda kv: -kv[1])))
    if rec.failures:
        lines += ["", "Failures: " + "; ".join(f"{k} ({v})" for k, v in rec.failures.items())]
    if d["binding_constraints"]:
        lines.append("What bound the answer: " + "; ".join(d["binding_constraints"]))
    for line in layers_lines(d["layers_that_matter"]):
        lines += ["", line]
    return "\n".join(lines) + "\n"


def _round(x: float | None, digits: int) -> str:
    return "n/a" if x is None else str(round(x, digits))
