"""What a candidate costs before any training: its structure, and the best case its methods reach.

A candidate's params, MFLOPs and dense size do not depend on its weights: they are counted on a
build on PyTorch's meta device (:mod:`recommender.shape_costs`, tens of milliseconds for a
ResNet-101 where a real build, fvcore and ``torch.save`` took seconds). Each compression method
of its recipe declares what it can lower and, where it can, how far from the structure alone
(``estimate`` in :mod:`recommender.compress.methods`): structured pruning prunes the untrained
build (channel counts do not depend on the weights), unstructured pruning zeroes a known number
of conv weights, int8 shrinks the size by at most 4x. A budget that the best case still breaks
cannot be met by training: the candidate is skipped before it costs a training, and the sampler
is told why.

The check runs in two passes. The *quick* one uses each method's ``bound`` (a lower bound of its
estimate that needs no weights, on the meta build): when the unmodified structure meets every
budget, or when even the quick lower bound breaks one, the answer is known in milliseconds. Only
a candidate between the two (its structure too large, its bound within the budget) pays for the
*exact* pass: a real build and each method's ``estimate`` (structured pruning runs torch-pruning,
about a second on a ResNet-101).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import measure as measure_mod
from ..compress.methods import CompressContext, StructureCosts, get_method
from ..constraints import Budget
from ..models import build_model, get_family
from ..models.arch import ArchConfig
from ..recipe import Recipe
from ..shape_costs import build_meta, shape_costs

__all__ = ["StructureCheck", "best_case", "quick_best_case", "structure", "check_structure", "STRUCTURAL"]

#: Budget metrics a structure can bound (latency needs the trained, compressed model).
STRUCTURAL = ("params", "nonzero-params", "flops", "size")


@dataclass
class StructureCheck:
    """The best case of a recipe and the budgets it breaks.

    ``costs``: best-case params / non-zero params (counts), MFLOPs and dense size (MB); the
    unmodified structure's when that already meets every budget (see :func:`best_case`); a lower
    bound of the best case when the quick pass already breaks a budget.
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


@functools.lru_cache(maxsize=32)
def _structure(model: str, identity: str, num_classes: int, arch_json: str, input_size: tuple[int, ...],
               flops: bool) -> tuple[nn.Module, StructureCosts, float]:
    arch = ArchConfig.from_json(arch_json)
    net = build_meta(lambda: build_model(model, arch, num_classes=num_classes))
    if net is None:  # a builder that computes with tensor data: a real build
        net = build_model(model, arch, num_classes=num_classes)
    net = net.eval()
    sc = shape_costs(net, input_size, flops=flops)
    mflops = sc.mflops
    if flops and mflops is None:  # an op counted by fvcore but not from shapes: fvcore itself
        real = build_model(model, arch, num_classes=num_classes)
        mflops = measure_mod.count_flops(real, input_size) / 1e6
    return net, StructureCosts(sc.params, sc.params, mflops, sc.size_mb), sc.size_mb_max


def structure(model: str, num_classes: int, arch: ArchConfig, input_size: tuple[int, ...],
              flops: bool = True) -> tuple[nn.Module, StructureCosts, float]:
    """An untrained build of ``arch`` (on the meta device where the family allows: no data),
    its costs: params (count), fvcore MFLOPs at ``input_size`` (None without ``flops``), dense
    size (MB, a lower bound of ``torch.save``'s by 100-400 bytes per tensor); and an upper bound
    of that size (MB). Memoised: methods' estimates must not change the model in place."""
    return _structure(model, get_family(model).identity, num_classes, arch.to_json(sort_keys=True),
                      tuple(input_size), flops)


def quick_best_case(net: nn.Module, costs: StructureCosts, recipe: Recipe, input_size: tuple[int, ...]
                    ) -> tuple[StructureCosts, set[str], bool]:
    """A lower bound of the best case from each method's ``bound`` on the (meta) build ``net``
    with the structure's ``costs``: (costs, metrics lowered by a method without a bound, whether
    the bound is the exact best case: every method's bound is its estimate)."""
    ctx = CompressContext(example_input=torch.zeros(input_size, device=_device(net)))
    unbounded: set[str] = set()
    exact = True
    for cfg in recipe.stages():
        method = get_method(cfg.stage, cfg.method)
        if method.bound is None:
            unbounded |= set(method.lowers)
            exact = False
            continue
        exact = exact and method.bound is method.estimate
        net, costs = method.bound(net, cfg, costs, ctx)
    return costs, unbounded, exact


def best_case(model: str, num_classes: int, recipe: Recipe, input_size: tuple[int, ...],
              flops: bool = True, within: list[Budget] | None = None) -> tuple[StructureCosts, set[str]]:
    """Best-case costs of ``recipe`` on ``model`` from an untrained build, and the metrics some
    method lowers without an estimate. MFLOPs are fvcore's at ``input_size`` (None when
    ``flops`` is False). When the unmodified structure already meets every budget of ``within``,
    its costs are returned without running the methods' estimates (methods only lower costs);
    when the methods' quick lower bounds already break one of them, those bounds are returned
    (the exact estimate of structured pruning takes about a second on a deep network)."""
    net, costs, size_max = structure(model, num_classes, recipe.arch, input_size, flops)
    high = StructureCosts(costs.params, costs.nonzero_params, costs.mflops, size_max)
    if within and all(b.violation(high.as_costs()) <= 0 for b in within):
        return high, set()
    quick, quick_unbounded, exact = quick_best_case(net, costs, recipe, input_size)
    judged = [b for b in within or [] if b.metric not in quick_unbounded]
    if exact or any(b.violation(quick.as_costs()) > 0 for b in judged):
        return quick, quick_unbounded
    real = build_model(model, recipe.arch, num_classes=num_classes).eval()
    costs = StructureCosts(costs.params, costs.nonzero_params, costs.mflops, measure_mod.size_mb(real))
    ctx = CompressContext(example_input=torch.randn(input_size))
    unbounded: set[str] = set()
    for cfg in recipe.stages():
        method = get_method(cfg.stage, cfg.method)
        if method.estimate is None:
            unbounded |= set(method.lowers)
            continue
        real, costs = method.estimate(real, cfg, costs, ctx)
    return costs, unbounded


def _device(net: nn.Module) -> Any:
    return next((p.device for p in net.parameters()), torch.device("cpu"))


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
