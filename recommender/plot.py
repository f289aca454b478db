"""The Pareto plot of a study's answer: accuracy (%) against the primary cost.

:func:`plot_pareto` draws ``pareto.png`` with matplotlib's Agg canvas on a ``Figure`` of its own
(no pyplot, so no global backend or figure state changes); :func:`plot_pareto_html` writes an
interactive ``pareto.html`` with ``optuna.visualization.plot_pareto_front`` where plotly is
installed (``pip install "recommender[plots]"``), and :func:`pareto_figure_plotly` returns that
figure for optuna-dashboard.

Every point is a finished trial at the search fidelity (its proxy accuracy and primary cost):
feasible trials, infeasible ones, the feasible Pareto front joined by a step line, and the
recommended recipe (or, when nothing is feasible, the closest candidate). The baseline accuracy is
a horizontal reference line, the tolerance (baseline minus the allowed drop) a dashed one, and the
primary budget a vertical one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import atomic_write

if TYPE_CHECKING:  # the report imports torch-free modules only; keep this import light too
    from .report import Recommendation

__all__ = ["plot_pareto", "plot_pareto_html", "pareto_figure_plotly", "plotly_available", "LOG_SPAN"]

#: the x axis is logarithmic when the largest primary cost exceeds the smallest by this factor
LOG_SPAN = 10.0


def plotly_available() -> bool:
    """Whether plotly (for ``pareto.html`` and the dashboard plot) is installed."""
    return importlib.util.find_spec("plotly") is not None


def _points(rec: "Recommendation") -> tuple[list[tuple[float, float, int]], list[tuple[float, float, int]]]:
    """(feasible, infeasible) points as (primary cost, accuracy %, trial number)."""
    from .report import completed, is_feasible

    feasible: list[tuple[float, float, int]] = []
    infeasible: list[tuple[float, float, int]] = []
    if rec.study is not None:
        for t in completed(rec.study):
            acc, cost = t.values
            (feasible if is_feasible(t) else infeasible).append((float(cost), 100.0 * float(acc), t.number))
    else:  # a Recommendation without its study: what it carries
        front = {c.trial for c in rec.front}
        budget = rec.budgets[0] if rec.budgets else None
        for c in [*rec.front, *rec.closest]:
            cost = budget.value(c.proxy.costs) if budget else float("nan")
            (feasible if c.trial in front else infeasible).append((cost, 100.0 * (c.proxy.accuracy or 0.0), c.trial))
    return feasible, infeasible


def _cost_label(rec: "Recommendation") -> str:
    b = rec.budgets[0] if rec.budgets else None
    if b is None:
        return "primary cost"
    if b.predicted:  # a prediction for another device says so on the axis
        return f"latency on {Path(b.profile).name}, {b.source.split(' (')[0]} ({b.unit})"
    return b.unit if b.unit == b.metric else f"{b.metric} ({b.unit})"


def plot_pareto(rec: "Recommendation", path: str | Path, *, dpi: int = 120, width_in: float = 8.0,
                height_in: float = 5.0) -> Path:
    """Write the Pareto plot of ``rec`` as a PNG to ``path`` (atomically) and return the path.

    Args:
        rec: the study's answer (:class:`recommender.report.Recommendation`); its ``study`` gives
            every finished trial, else only the front and the closest candidates are drawn.
        path: the PNG file (``studies/<study>/pareto.png``).
        dpi: resolution in dots per inch.
        width_in, height_in: figure size in inches.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    feasible, infeasible = _points(rec)
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself to the figure: no pyplot, no global backend
    ax = fig.add_subplot(1, 1, 1)
    budget = rec.budgets[0] if rec.budgets else None

    if infeasible:
        ax.scatter([p[0] for p in infeasible], [p[1] for p in infeasible], marker="x", color="tab:red",
                   alpha=0.6, label=f"infeasible ({len(infeasible)})")
    if feasible:
        ax.scatter([p[0] for p in feasible], [p[1] for p in feasible], marker="o", color="tab:blue",
                   alpha=0.7, label=f"feasible ({len(feasible)})")
    if rec.front:
        front = sorted(((budget.value(c.proxy.costs) if budget else 0.0, 100.0 * (c.proxy.accuracy or 0.0))
                        for c in rec.front))
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:blue", linewidth=1,
                label="feasible Pareto front")
    c = rec.chosen or (rec.closest[0] if rec.closest else None)
    if c is not None:
        cx = budget.value(c.proxy.costs) if budget else 0.0
        cy = 100.0 * (c.proxy.accuracy or 0.0)
        label = (f"recommended (trial {c.trial})" if rec.feasible
                 else f"closest, not feasible (trial {c.trial})")
        ax.scatter([cx], [cy], marker="*", s=260, color="tab:green" if rec.feasible else "tab:orange",
                   edgecolors="black", zorder=5, label=label)
    ys = [p[1] for p in feasible + infeasible]
    xs_extra: list[float] = [budget.limit] if budget else []
    if rec.baseline is not None and rec.baseline.accuracy is not None:
        base = 100.0 * rec.baseline.accuracy
        floor = base - rec.max_drop.allowed_pp(rec.baseline.accuracy)
        below = "" if floor > 0 else f" (tolerance {rec.max_drop.describe()}: below 0%)"
        ax.axhline(base, color="black", linewidth=1, label=f"baseline {base:.1f}%{below}")
        base_cost = budget.value(rec.baseline.costs) if budget else None
        if base_cost is not None and 0 < base_cost < float("inf"):
            ax.scatter([base_cost], [base], marker="D", color="black", zorder=4, label="baseline model")
            xs_extra.append(base_cost)
        ys.append(base)
        if floor > 0:  # a tolerance below 0 % accuracy bounds nothing
            ax.axhline(floor, color="black", linestyle="--", linewidth=1,
                       label=f"tolerance {floor:.1f}% (max drop {rec.max_drop.describe()})")
            ys.append(floor)
    if ys:
        pad = max(1.0, 0.05 * (max(ys) - min(ys)))
        ax.set_ylim(max(0.0, min(ys) - pad), min(100.0, max(ys) + pad))
    if budget is not None:
        ax.axvline(budget.limit, color="tab:gray", linestyle=":", linewidth=1.2,
                   label=f"budget {budget.describe()}")

    xs = [p[0] for p in feasible + infeasible if p[0] > 0] + xs_extra
    if xs and min(xs) > 0 and max(xs) / min(xs) > LOG_SPAN:
        ax.set_xscale("log")
    ax.set_xlabel(_cost_label(rec))
    ax.set_ylabel("top-1 accuracy (%) at the search fidelity")
    ax.set_title(f"{rec.spec.get('model', '?')} on {rec.spec.get('dataset', '?')}: {rec.study_name}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if not (feasible or infeasible):
        n = rec.counts.get("finished", 0)
        text = (f"no trial trained to the end ({n} finished: pruned or failed)" if n else "no finished trial yet")
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center")
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def pareto_figure_plotly(rec: "Recommendation") -> Any:
    """optuna's Pareto-front figure (plotly) for the study: feasible front, dominated feasible
    trials and infeasible trials (from the trials' own constraints); accuracy in %."""
    import optuna

    if rec.study is None:
        raise ValueError("the recommendation carries no study")
    return optuna.visualization.plot_pareto_front(
        rec.study, target_names=["accuracy (%)", _cost_label(rec)],
        targets=lambda t: (100.0 * t.values[0], t.values[1]))


def plot_pareto_html(rec: "Recommendation", path: str | Path) -> Path | None:
    """Write the interactive plot to ``path`` (self-contained HTML: plotly.js is embedded, about
    4 MB, so it opens offline); None when plotly is not installed or the answer carries no study."""
    from .report import completed

    if not plotly_available() or rec.study is None or not completed(rec.study):
        return None
    fig = pareto_figure_plotly(rec)
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    return atomic_write(path, html)
