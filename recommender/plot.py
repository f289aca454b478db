"""The plot of a study's answer: accuracy (%) against the primary cost, one panel per rung.

:func:`plot_data` lays the ledger out as panels (what each point is, where the answer sits, which
lines to draw, the zoomed accuracy range and what lies below it); :func:`plot_pareto` draws them
into ``pareto.png`` with matplotlib's Agg canvas on a ``Figure`` of its own (no pyplot, so no
global backend or figure state changes); :func:`plot_pareto_html` writes the same panels as an
interactive ``pareto.html`` where plotly is installed (``pip install "recommender[plots]"``),
and :func:`pareto_figure_plotly` returns that figure for optuna-dashboard.

Panel k shows every candidate measured at rung k (its accuracy there, against that rung's
baseline, tolerance and budget lines): the ones that held there, the ones that missed, the
front of the candidates that rung decided, and the recommended candidate in the panel of the
rung that decided it. The accuracy axis zooms to where the decision is made (the tolerance line
and the candidates near it); a candidate far below is drawn on the lower edge and counted.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import atomic_write

if TYPE_CHECKING:  # the report imports torch-free modules only; keep this import light too
    from .report import Recommendation

__all__ = ["plot_data", "plot_pareto", "plot_pareto_html", "pareto_figure_plotly", "plotly_available", "LOG_SPAN",
           "ZOOM_MARGIN_PP"]

#: the x axis is logarithmic when the largest primary cost exceeds the smallest by this factor
LOG_SPAN = 10.0
#: accuracy (pp) shown below the lowest of the tolerance line and the candidates that held
ZOOM_MARGIN_PP = 5.0


def plotly_available() -> bool:
    """Whether plotly (for ``pareto.html`` and the dashboard plot) is installed."""
    return importlib.util.find_spec("plotly") is not None


def _cost_label(rec: "Recommendation") -> str:
    b = rec.budgets[0] if rec.budgets else None
    if b is None:
        return "primary cost"
    if b.predicted:  # a prediction for another device says so on the axis
        return f"latency on {Path(b.profile).name}, {b.source.split(' (')[0]} ({b.unit})"
    return b.unit if b.unit == b.metric else f"{b.metric} ({b.unit})"


def plot_data(rec: "Recommendation") -> list[dict[str, Any]]:
    """The panels of the plot, one per rung with a measurement, lowest first. Each is a dict:

    ``rung``, ``label``; ``baseline`` (accuracy %, or None) and ``baseline_cost``; ``floor``
    (the tolerance line: baseline minus the allowed drop, %; None when below 0); ``budget`` (the
    primary budget's limit); ``points``: ``{trial, cost, accuracy (%), holds, decided_here}``
    for every candidate measured there; ``front``: (cost, accuracy %) of the candidates on the
    ledger's front that this rung decided; ``chosen``: the recommended candidate's point when
    this rung decided it (``{trial, cost, accuracy, feasible}``), or the closest candidate's
    when nothing is feasible; ``ylim``: the accuracy range shown (%); ``below``: trials whose
    accuracy lies under it.
    """
    led = rec.ledger
    p = rec.budgets[0] if rec.budgets else None
    ans = rec.answer
    star = ans.chosen or (ans.closest[0] if ans.closest else None)
    front = {e.trial for e in ans.front}
    panels = []
    for r in led.rungs:
        measured = led.measured_at(r.index)
        if not measured and r.index > 0:
            continue
        base = r.baseline
        pts = [{"trial": e.trial, "cost": p.value(e.costs) if p else 0.0, "accuracy": 100.0 * m.accuracy,
                "holds": m.verdict.holds, "decided_here": e.rung == r.index} for e, m in measured]
        panel: dict[str, Any] = {
            "rung": r.index, "label": r.label, "budget": p.limit if p else None,
            "baseline": None if base is None else 100.0 * base.accuracy,
            "baseline_cost": p.value(base.costs) if (p is not None and base is not None and base.costs) else None,
            "floor": None, "points": pts,
            "front": sorted((pt["cost"], pt["accuracy"]) for pt in pts if pt["trial"] in front and pt["decided_here"]),
            "chosen": None}
        if base is not None:
            floor = 100.0 * base.accuracy - rec.max_drop.allowed_pp(base.accuracy)
            panel["floor"] = floor if floor > 0 else None
        if star is not None and star.rung == r.index and star.deciding is not None:
            panel["chosen"] = {"trial": star.trial, "cost": p.value(star.costs) if p else 0.0,
                               "accuracy": 100.0 * star.deciding.accuracy, "feasible": ans.feasible}
        panel["ylim"], panel["below"] = _zoom(panel)
        panels.append(panel)
    return panels


def _zoom(panel: dict[str, Any]) -> tuple[tuple[float, float], list[int]]:
    """The accuracy range where the decision is made: from a margin under the lowest of the
    tolerance line, the baseline and the candidates that held (or, when none held, the best
    missed ones) to just over the highest point; trials under it are listed."""
    pts = panel["points"]
    accs = [pt["accuracy"] for pt in pts]
    anchors = [pt["accuracy"] for pt in pts if pt["holds"]]
    for key in ("floor", "baseline"):
        if panel[key] is not None:
            anchors.append(panel[key])
    if panel["chosen"] is not None:
        anchors.append(panel["chosen"]["accuracy"])
    if not anchors:
        anchors = sorted(accs, reverse=True)[:3] or [0.0]
    top = max(anchors + accs)
    low = min(anchors) - ZOOM_MARGIN_PP
    low = max(0.0, low)
    if top - low < 2.0:
        low = max(0.0, top - 2.0)
    pad = max(0.5, 0.05 * (top - low))
    lo, hi = max(0.0, low - (pad if low > 0 else 0.0)), min(100.0, top + pad)
    below = [pt["trial"] for pt in pts if pt["accuracy"] < lo]
    return (lo, hi), below


def plot_pareto(rec: "Recommendation", path: str | Path, *, dpi: int = 120, panel_width_in: float = 6.0,
                height_in: float = 5.0) -> Path:
    """Write the plot of ``rec`` (:func:`plot_data`) as a PNG to ``path`` (atomically) and
    return the path.

    Args:
        rec: the study's answer (:class:`recommender.report.Recommendation`).
        path: the PNG file (``studies/<study>/pareto.png``).
        dpi: resolution in dots per inch.
        panel_width_in, height_in: size of one panel in inches.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = plot_data(rec)
    fig = Figure(figsize=(panel_width_in * max(1, len(panels)), height_in), dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself to the figure: no pyplot, no global backend
    axes = [fig.add_subplot(1, max(1, len(panels)), i + 1) for i in range(max(1, len(panels)))]
    budget = rec.budgets[0] if rec.budgets else None
    for ax, panel in zip(axes, panels or [None]):
        if panel is None:
            ax.text(0.5, 0.5, "no finished trial yet", transform=ax.transAxes, ha="center", va="center")
            continue
        _draw_panel(ax, rec, panel, budget)
    title = f"{rec.question.model} on {rec.question.dataset}"
    fig.suptitle(title if len(title) <= 90 else title[:89] + "…", fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _draw_panel(ax: Any, rec: "Recommendation", panel: dict[str, Any], budget: Any) -> None:
    (lo, hi), below = panel["ylim"], set(panel["below"])

    def y(v: float) -> float:
        return max(v, lo)

    held = [pt for pt in panel["points"] if pt["holds"]]
    missed = [pt for pt in panel["points"] if not pt["holds"]]
    for group, style in ((missed, dict(marker="x", color="tab:red", alpha=0.6, label=f"missed here ({len(missed)})")),
                         (held, dict(marker="o", color="tab:blue", alpha=0.7, label=f"held here ({len(held)})"))):
        if group:
            ax.scatter([pt["cost"] for pt in group], [y(pt["accuracy"]) for pt in group], **style)
    clipped = [pt for pt in panel["points"] if pt["trial"] in below]
    if clipped:
        ax.scatter([pt["cost"] for pt in clipped], [lo] * len(clipped), marker="v", color="tab:gray", zorder=3,
                   label=f"{len(clipped)} below {lo:.0f}% (trial{'s' if len(clipped) > 1 else ''} "
                         f"{', '.join(str(pt['trial']) for pt in clipped[:4])}{'…' if len(clipped) > 4 else ''})")
    if len(panel["front"]) > 1:
        ax.step([c for c, _ in panel["front"]], [a for _, a in panel["front"]], where="post", color="tab:blue",
                linewidth=1, label="front decided here")
    ch = panel["chosen"]
    if ch is not None:
        label = (f"recommended (trial {ch['trial']})" if ch["feasible"]
                 else f"closest, not feasible (trial {ch['trial']})")
        ax.scatter([ch["cost"]], [y(ch["accuracy"])], marker="*", s=260, color="tab:green" if ch["feasible"]
                   else "tab:orange", edgecolors="black", zorder=5, label=label)
    xs = [pt["cost"] for pt in panel["points"] if pt["cost"] > 0]
    if panel["baseline"] is not None:
        ax.axhline(panel["baseline"], color="black", linewidth=1, label=f"baseline {panel['baseline']:.1f}%")
        if panel["baseline_cost"] and 0 < panel["baseline_cost"] < float("inf"):
            ax.scatter([panel["baseline_cost"]], [y(panel["baseline"])], marker="D", color="black", zorder=4,
                       label="baseline model")
            xs.append(panel["baseline_cost"])
    if panel["floor"] is not None:
        ax.axhline(panel["floor"], color="black", linestyle="--", linewidth=1,
                   label=f"tolerance {panel['floor']:.1f}% (max drop {rec.max_drop.describe()})")
    if budget is not None:
        ax.axvline(budget.limit, color="tab:gray", linestyle=":", linewidth=1.2, label=f"budget {budget.describe()}")
        xs.append(budget.limit)
    ax.set_ylim(lo, hi)
    if xs and min(xs) > 0 and max(xs) / min(xs) > LOG_SPAN:
        ax.set_xscale("log")
    ax.set_xlabel(_cost_label(rec))
    ax.set_ylabel("top-1 accuracy (%)")
    label = panel["label"]
    ax.set_title(f"rung {panel['rung']}: {label if len(label) <= 48 else label[:47] + '…'}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=7, framealpha=0.9)


def pareto_figure_plotly(rec: "Recommendation") -> Any:
    """The same panels as an interactive plotly figure (accuracy in %, hover: trial)."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    panels = plot_data(rec)
    fig = make_subplots(rows=1, cols=max(1, len(panels)),
                        subplot_titles=[f"rung {p['rung']}: {p['label']}" for p in panels] or ["no trial"])
    for i, panel in enumerate(panels, start=1):
        for holds, name, color in ((True, "held", "royalblue"), (False, "missed", "crimson")):
            pts = [pt for pt in panel["points"] if pt["holds"] == holds]
            if pts:
                fig.add_trace(go.Scatter(x=[pt["cost"] for pt in pts], y=[pt["accuracy"] for pt in pts],
                                         mode="markers", name=f"{name} at rung {panel['rung']}",
                                         marker={"color": color, "symbol": "circle" if holds else "x"},
                                         text=[f"trial {pt['trial']}" for pt in pts]), row=1, col=i)
        if panel["chosen"] is not None:
            ch = panel["chosen"]
            fig.add_trace(go.Scatter(x=[ch["cost"]], y=[ch["accuracy"]], mode="markers",
                                     name=f"{'recommended' if ch['feasible'] else 'closest'} (trial {ch['trial']})",
                                     marker={"symbol": "star", "size": 16, "color": "green" if ch["feasible"]
                                             else "orange"}), row=1, col=i)
        for key, dash in (("baseline", "solid"), ("floor", "dash")):
            if panel[key] is not None:
                fig.add_hline(y=panel[key], line_dash=dash, line_color="black", row=1, col=i)
        if panel["budget"] is not None:
            fig.add_vline(x=panel["budget"], line_dash="dot", line_color="gray", row=1, col=i)
        fig.update_yaxes(range=list(panel["ylim"]), title_text="top-1 accuracy (%)", row=1, col=i)
        fig.update_xaxes(title_text=_cost_label(rec), row=1, col=i)
    fig.update_layout(title=f"{rec.question.model} on {rec.question.dataset}")
    return fig


def plot_pareto_html(rec: "Recommendation", path: str | Path) -> Path | None:
    """Write the interactive plot to ``path`` (self-contained HTML: plotly.js is embedded, about
    4 MB, so it opens offline); None when plotly is not installed or nothing was measured."""
    if not plotly_available() or not rec.ledger.entries:
        return None
    html = pareto_figure_plotly(rec).to_html(include_plotlyjs=True, full_html=True)
    return atomic_write(path, html)
