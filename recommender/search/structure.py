"""What a candidate costs before any training: its structure, and the best case its methods reach.

A candidate's params, MFLOPs and dense size are known in milliseconds to seconds from an untrained
build. Each compression method of its recipe declares what it can lower and, where it can, how far
from the structure alone (``estimate`` in :mod:`recommender.compress.methods`): structured
pruning prunes the untrained build (channel counts do not depend on the weights), unstructured
pruning zeroes a known number of conv weights, int8 shrinks the size by at most 4x. A budget that
the best case still breaks cannot be met by training: the candidate is skipped before it costs a
training, and the sampler is told why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import measure as measure_mod
from ..compress.methods import CompressContext, StructureCosts, get_method
from ..constraints import Budget
from ..models import build_model
from ..recipe import Recipe

__all__ = ["StructureCheck", "best_case", "check_structure"]

#: Budget metrics a structure can bound (latency needs the trained, compressed model).
STRUCTURAL = ("params", "nonzero-params", "flops", "size")


@dataclass
class StructureCheck:
    """The best case of a recipe and the budgets it breaks.

    ``costs``: best-case params / non-zero params (counts), MFLOPs and dense size (MB); the
    unmodified structure's when that already meets every budget (see :func:`best_case`).
    ``unbounded``: metrics some method lowers without an estimate (never judged here).
    ``excess``: every judged budget -> relative excess of the best case (<= 0: within it).
    ``violations``: the budgets the best case breaks (excess > 0).
    """

    costs: StructureCosts
    unbounded: set[str] = field(default_factory=set)
    excess: dict[str, float] = field(default_factory=dict)

    @property
    def violations(self) -> dict[str, float]:
        return {name: v for name, v in self.excess.items() if v > 0}

    @property
    def feasible(self) -> bool:
        return not self.violations

    def reason(self) -> str:
        """One line: which budget the structure breaks, by how much."""
        parts = [f"{name} best case {v:+.0%} over the limit" for name, v in self.violations.items()]
        return "structure breaks the budget before training: " + "; ".join(parts)


def best_case(model: str, num_classes: int, recipe: Recipe, input_size: tuple[int, ...],
              flops: bool = True, within: list[Budget] | None = None) -> tuple[StructureCosts, set[str]]:
    """Best-case costs of ``recipe`` on ``model`` from an untrained build, and the metrics some
    method lowers without an estimate. MFLOPs are fvcore's at ``input_size`` (None when
    ``flops`` is False). When the unmodified structure already meets every budget of ``within``,
    its costs are returned without running the methods' estimates (methods only lower costs, and
    the structured-pruning estimate of some graphs takes minutes)."""
    net = build_model(model, recipe.arch, num_classes=num_classes).eval()
    n = measure_mod.count_params(net)
    mflops = measure_mod.count_flops(net, input_size) / 1e6 if flops else None
    costs = StructureCosts(n, n, mflops, measure_mod.size_mb(net))
    if within and all(b.violation(costs.as_costs()) <= 0 for b in within):
        return costs, set()
    ctx = CompressContext(example_input=torch.randn(input_size))
    unbounded: set[str] = set()
    for cfg in recipe.stages():
        method = get_method(cfg.stage, cfg.method)
        if method.estimate is None:
            unbounded |= set(method.lowers)
            continue
        net, costs = method.estimate(net, cfg, costs, ctx)
    return costs, unbounded


def check_structure(model: str, num_classes: int, recipe: Recipe, budgets: list[Budget],
                    input_size: tuple[int, ...]) -> StructureCheck:
    """Compare the best case of ``recipe`` with the structural budgets (params, non-zero params,
    FLOPs, size); latency and metrics lowered without an estimate are not judged."""
    judged = [b for b in budgets if b.metric in STRUCTURAL]
    if not judged:
        return StructureCheck(StructureCosts(0, 0, None, 0.0))
    costs, unbounded = best_case(model, num_classes, recipe, input_size,
                                 flops=any(b.metric == "flops" for b in judged), within=judged)
    out = StructureCheck(costs, unbounded)
    values = costs.as_costs()
    for b in judged:
        if b.metric in unbounded:
            continue
        out.excess[b.describe()] = b.violation(values)
    return out
