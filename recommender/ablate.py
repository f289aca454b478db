"""The paper's tables, automated: one row per preset of a model with its costs (and accuracy).

Structure only: params, MFLOPs (fvcore at 1x3x32x32), size MB and the percentage of the baseline
(the paper's "variant 1"). With training: every preset is trained under a proxy protocol on a
dataset and evaluated against the baseline trained under the same protocol (paired drop with a
95 % interval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import measure as measure_mod
from .errors import ArchError, RecommenderError
from .models import build_model, get_family, get_preset, list_presets
from .models.arch import ArchConfig

Progress = Callable[[str, int, int], None]


@dataclass
class AblationRow:
    """One preset. Units: params (count), mflops (MFLOPs), size_mb (MB); percentages of the
    baseline row; accuracy in %, drop in percentage points with its 95 % interval."""

    preset: str
    description: str
    params: int | None
    mflops: float | None
    size_mb: float | None
    params_pct: float | None = 100.0
    mflops_pct: float | None = 100.0
    size_pct: float | None = 100.0
    accuracy: float | None = None
    acc_low: float | None = None
    acc_high: float | None = None
    drop: float | None = None
    drop_low: float | None = None
    drop_high: float | None = None
    train_seconds: float | None = None
    status: str = "ok"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def presets_for(model: str) -> list[str]:
    """The presets of ``model``'s family (a preset applies to every depth of its family); a
    family without presets is an error that says so."""
    names = list_presets(model)  # unknown model -> UnknownNameError
    if not names:
        raise RecommenderError(f"{model} ({get_family(model).name}) has no paper presets; `ablate` tabulates "
                               f"presets of the families that have them: "
                               f"{', '.join(sorted({get_preset(p).model for p in list_presets()}))}")
    return names


def ablate(model: str, num_classes: int = 10, *, structure_only: bool = True, dataset: str = "digits",
           fidelity: str = "proxy", data_dir: str | None = None, seed: int = 0,
           cache_dir: str | None = "studies/cache", presets: list[str] | None = None,
           progress: Progress | None = None,
           train_progress: Callable[[str, int, int, float], None] | None = None) -> list[AblationRow]:
    """Rows for every preset of ``model`` (the baseline first), optionally trained.

    A preset this model cannot build (grouped pointwise convs on a BasicBlock ResNet) is a row
    without costs whose ``status`` says why (``skipped: does not apply: ...``).

    ``progress(name, i, n)`` is called before each preset (also for structure only: building and
    counting FLOPs of a deep model takes seconds per preset); ``train_progress(label, step, total,
    loss)`` after every training step of the baseline and the presets."""
    names = presets or presets_for(model)
    rows: list[AblationRow] = []
    evaluator = baseline = None
    if not structure_only:
        from .cache import WeightsCache
        from .data import load_dataset
        from .evaluation import Evaluator
        from .protocol import get_protocol

        data = load_dataset(dataset, data_dir=data_dir, seed=seed)
        num_classes = data.num_classes
        evaluator = Evaluator(model, data, get_protocol(fidelity, seed=seed),
                              cache=WeightsCache(cache_dir) if cache_dir else None, latency=False,
                              progress=train_progress)
        if progress:
            progress("baseline", 0, len(names))
        baseline = evaluator.evaluate_baseline()
    base_costs = None
    for i, name in enumerate(names):
        preset = get_preset(name)
        if progress:
            progress(name, i, len(names))
        try:
            net = build_model(model, preset.arch, num_classes=num_classes)
        except ArchError as exc:  # a preset of the family this member cannot build: noted, skipped
            rows.append(AblationRow(name, preset.description, None, None, None, None, None, None,
                                    status=f"skipped: does not apply: {exc}"))
            continue
        costs = measure_mod.measure(net, latency=False)
        row = AblationRow(name, preset.description, costs.params, costs.mflops or 0.0, costs.size_mb)
        if base_costs is None:
            base_costs = measure_mod.measure(build_model(model, ArchConfig(), num_classes=num_classes), latency=False)
        row.params_pct = 100.0 * row.params / base_costs.params
        row.mflops_pct = 100.0 * row.mflops / (base_costs.mflops or 1.0)
        row.size_pct = 100.0 * row.size_mb / base_costs.size_mb
        if evaluator is not None:
            from .recipe import Recipe

            ev = evaluator.evaluate(Recipe(arch=preset.arch), baseline)
            if ev.ok:
                row.accuracy, row.acc_low, row.acc_high = (100 * ev.accuracy, 100 * ev.acc_low, 100 * ev.acc_high)
                row.drop, row.drop_low, row.drop_high = ev.drop_pp, ev.drop_low_pp, ev.drop_high_pp
                row.train_seconds = ev.train_seconds
            else:
                row.status = ev.reason
        rows.append(row)
    if progress:
        progress("done", len(names), len(names))
    return rows
