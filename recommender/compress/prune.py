"""Pruning: the paper's iterative global L1 unstructured pruning, and structured channel pruning.

``apply_pruning(model, cfg, *, example_input, batches=None, finetune=None) -> (model, PruneReport)``

- ``unstructured-l1`` (paper, section 6): global L1 magnitude pruning
  (``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``) over the ``weight`` of
  every module whose type is exactly ``nn.Conv2d`` (``include_linear=True`` adds ``nn.Linear``).
  Iterative: each round removes ``round(step * remaining)`` weights (20, 36, 48.8, 59, 67.2 % ...
  with step 0.2) and the last round removes exactly what is left to reach the target, so the
  achieved global sparsity over the pruned tensors equals ``round(target * elements) / elements``.
  ``finetune(model, cfg.finetune_steps)`` runs after every round while the masks are attached
  (pruned weights stay zero), then the masks are made permanent (``prune.remove``). Parameters
  stay; non-zero parameters fall. The report gives the dense size and a sparse-encoding size.
- ``structured-channel``: torch-pruning's dependency graph removes whole output channels, the
  same ``sparsity`` fraction in every prunable layer (local ranking, ``BasePruner``), with ``l1``
  (``MagnitudeImportance(p=1)``) or ``taylor`` importance. Residual adds and concatenations stay
  consistent through the dependency graph. Layers torch-pruning cannot handle are left alone
  (``PruneReport.ignored_layers`` says which and why): the classifier (last executed conv or
  linear), every conv/linear whose output feeds a channel shuffle or another transpose/permute
  (torch-pruning would map channels through it one-to-one, which is wrong and may raise
  ``ZeroDivisionError``), and grouped non-depthwise convolutions together with their producers.
  If pruning still fails or the pruned model does not run, a more conservative ignore set is
  tried, and finally the model is returned unpruned with ``prunable=False`` and the reason.

The model passed in is never modified: the pruned model is a copy.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from ..measure import count_flops, count_nonzero_params, count_params, safe_deepcopy, size_mb, sparse_size_mb
from ..errors import RecommenderError
from .methods import (CompressContext, MethodConfig, StructureCosts, check_fraction, check_int, get_method,
                      register_method)

__all__ = ["PruneReport", "apply_pruning", "unstructured_prune", "structured_prune", "prunable_tensors",
           "NoPruning", "UnstructuredL1Config", "StructuredChannelConfig", "MAX_ROUNDS"]

Finetune = Callable[[nn.Module, int], Any]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PruneReport:
    """What pruning did. Sparsities are fractions in [0, 1]; sizes in MB (bytes / 1024**2).

    ``achieved_sparsity``: unstructured: zeros / elements over the pruned tensors; structured:
    fraction of output channels removed over all conv and linear layers (ignored ones included).
    ``rounds``: cumulative sparsity after each unstructured round.
    ``ignored_layers``: structured only, module name -> reason it was left unpruned.
    """

    method: str
    target_sparsity: float
    achieved_sparsity: float = 0.0
    rounds: list[float] = field(default_factory=list)
    pruned_tensors: int = 0
    params_before: int = 0
    params_after: int = 0
    nonzero_before: int = 0
    nonzero_after: int = 0
    mflops_before: float | None = None
    mflops_after: float | None = None
    size_mb: float = 0.0
    sparse_size_mb: float = 0.0
    ignored_layers: dict[str, str] = field(default_factory=dict)
    prunable: bool = True
    note: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ============================================================================================
# unstructured


def prunable_tensors(model: nn.Module, include_linear: bool = False) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every module of type exactly Conv2d (and Linear if asked)."""
    types: tuple[type, ...] = (nn.Conv2d, nn.Linear) if include_linear else (nn.Conv2d,)
    return [(m, "weight") for m in model.modules() if type(m) in types]


def _zeros_and_elements(params: list[tuple[nn.Module, str]]) -> tuple[int, int]:
    zeros = elements = 0
    for m, name in params:
        w = getattr(m, name)
        elements += w.numel()
        zeros += w.numel() - int(torch.count_nonzero(w.detach()))
    return zeros, elements


def unstructured_prune(
    model: nn.Module,
    sparsity: float,
    *,
    step: float = 0.2,
    finetune: Finetune | None = None,
    finetune_steps: int = 0,
    include_linear: bool = False,
) -> tuple[nn.Module, PruneReport]:
    """Iterative global L1 unstructured pruning, in place; see the module docstring."""
    t0 = time.perf_counter()
    report = PruneReport(method="unstructured-l1", target_sparsity=float(sparsity))
    report.params_before = count_params(model)
    report.nonzero_before = count_nonzero_params(model)
    params = prunable_tensors(model, include_linear)
    report.pruned_tensors = len(params)
    if not params:
        report.prunable = False
        report.note = "no Conv2d weights to prune"
    else:
        total = sum(getattr(m, n).numel() for m, n in params)
        target_count = int(round(sparsity * total))
        pruned = 0
        while pruned < target_count:
            remaining = total - pruned
            amount = min(int(round(step * remaining)), target_count - pruned)
            amount = max(amount, 1)
            tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=amount)
            pruned += amount
            zeros, elements = _zeros_and_elements(params)
            report.rounds.append(zeros / elements)
            if finetune is not None and finetune_steps > 0:
                finetune(model, finetune_steps)
        for m, n in params:
            if tprune.is_pruned(m) and hasattr(m, n + "_mask"):
                tprune.remove(m, n)
        zeros, elements = _zeros_and_elements(params)
        report.achieved_sparsity = zeros / elements
    report.params_after = count_params(model)
    report.nonzero_after = count_nonzero_params(model)
    report.size_mb = size_mb(model)
    report.sparse_size_mb = sparse_size_mb(model)
    report.seconds = time.perf_counter() - t0
    return model, report


# ============================================================================================
# structured


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m)


def _execution_order(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: order.append(mod))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


@contextlib.contextmanager
def _tolerant_reshape_mapping() -> Iterator[None]:
    """torch-pruning 1.6 divides by an inferred channel count of 0 when a reshape (the second
    view of a channel shuffle) sits after a split whose other half bypasses every layer
    (ShuffleNet-V2 units): ``ZeroDivisionError`` while building the dependency graph. Skip the
    index mapping of such a reshape; every layer around a shuffle is ignored anyway."""
    from torch_pruning.dependency import index_mapping as im

    original = im.update_reshape_index_mapping

    def tolerant(graph: Any, node: Any) -> None:
        if id(node) in getattr(graph, "_shuffle_reshapes", ()):  # mapped by shuffle_prune
            return
        try:
            original(graph, node)
        except ZeroDivisionError:
            pass

    im.update_reshape_index_mapping = tolerant
    try:
        yield
    finally:
        im.update_reshape_index_mapping = original


def _analyse(model: nn.Module, x: torch.Tensor, level: int, aligned: bool = False) -> dict[str, str]:
    """Names of the layers to ignore, with reasons. level 0: minimal; 1: conservative.
    ``aligned``: the transposes of :class:`ChannelShuffle` modules are mapped
    (:mod:`.shuffle_prune`), so the layers around them are not ignored at level 0."""
    import torch_pruning as tp

    from .shuffle_prune import _transpose_of, shuffle_hooks

    names = {m: n for n, m in model.named_modules()}
    ignored: dict[str, str] = {}

    order = _execution_order(model, x)
    if order:
        head = order[-1]
        ignored[names[head]] = "classifier (final layer producing the class scores)"

    with shuffle_hooks(model) as seen:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    node_of = dg.module2node
    mapped: set[int] = set()
    if aligned and level == 0:
        for node in list(node_of.values()):
            if getattr(node, "grad_fn", None) in seen:
                found = _transpose_of(node)
                if found is not None:
                    mapped.add(id(found[0]))

    def is_layer(n: Any) -> bool:
        return isinstance(n.module, (nn.Conv2d, nn.Linear)) and n.module in names

    def walk(start: Iterable[Any], edges: str) -> list[nn.Module]:
        """Conv/linear layers reached from ``start`` along ``edges`` (``inputs``: producers of its
        channels, ``outputs``: consumers), through BN, activations, ops and depthwise convs."""
        found: list[nn.Module] = []
        stack, seen = list(start), set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if is_layer(n):
                found.append(n.module)
                if not _is_depthwise(n.module):
                    continue
            stack.extend(getattr(n, edges))
        return found

    def producers(start: Iterable[Any]) -> list[nn.Module]:
        return walk(start, "inputs")

    def consumers(start: Iterable[Any]) -> list[nn.Module]:
        return walk(start, "outputs")

    def add(mods: Iterable[nn.Module], reason: str) -> None:
        for m in mods:
            ignored.setdefault(names[m], reason)

    for node in list(node_of.values()):
        op = node.module
        if isinstance(op, tp.ops._ElementWiseOp):
            fn = str(getattr(op, "_grad_fn", "")).lower()
            if ("transpose" in fn or "permute" in fn) and id(node) not in mapped:
                add(producers(node.inputs), "feeds a channel shuffle/transpose")
                after = consumers(node.outputs)
                add([m for m in after if _is_depthwise(m)], "depthwise conv after a channel shuffle/transpose")
                if level >= 2:
                    add(after, "follows a channel shuffle/transpose")
        elif is_layer(node) and _is_depthwise(node.module) and not producers(node.inputs):
            add([node.module], "depthwise conv on the network input (its channels are the image's)")
        elif level >= 1 and is_layer(node) and _is_grouped(node.module):
            add([node.module], f"grouped convolution (groups={node.module.groups})")
            add(producers(node.inputs), "feeds a grouped convolution")
            if level >= 2:
                add(consumers(node.outputs), "follows a grouped convolution")

    if level >= 2:
        # widen to whole blocks: every conv/linear sharing a parent module with an ignored one
        parents = {n.rsplit(".", 1)[0] for n in ignored if "." in n}
        for n, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and "." in n and n.rsplit(".", 1)[0] in parents:
                ignored.setdefault(n, "in the same block as an ignored layer (conservative retry)")
    return ignored


def _taylor_gradients(model: nn.Module, example_input: torch.Tensor, batches: Batches | None, max_batches: int) -> None:
    model.zero_grad(set_to_none=True)
    loss_fn = nn.CrossEntropyLoss()
    used = 0
    if batches is not None:
        for x, y in batches:
            out = model(x)
            loss_fn(out.flatten(1), y.long()).backward()
            used += 1
            if used >= max_batches:
                break
    if used == 0:  # pseudo-labels: the model's own predictions on the example input
        with torch.no_grad():
            y = model(example_input).flatten(1).argmax(1)
        loss_fn(model(example_input).flatten(1), y).backward()


def _out_channels(model: nn.Module, skip: set[str] | None = None) -> int:
    skip = skip or set()
    return sum(
        m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in skip
    )


def _attempt(
    model: nn.Module,
    ratio: float,
    level: int,
    example_input: torch.Tensor,
    importance: str,
    batches: Batches | None,
    taylor_batches: int,
    ref_shape: tuple[int, ...],
    params_before: int,
    ratios: dict[str, float] | None = None,
    round_to: int = 1,
    grouped: str = "skip",
) -> tuple[nn.Module, dict[str, str]]:
    """One torch-pruning run on a fresh copy; raises when the result is unusable. ``ratios``:
    per-group ratios (group root module name -> fraction; groups not named keep ``ratio``),
    scaled by ``ratio / nominal`` where the caller calibrates; ``round_to``: kept channel counts
    rounded down to this multiple (torch-pruning's ``round_to``; 1 = off)."""
    import torch_pruning as tp

    from .shuffle_prune import RootSafeImportance, group_aware_convs, prune_aligned, shuffle_hooks

    candidate = safe_deepcopy(model).eval()
    aligned = grouped == "aligned"
    with warnings.catch_warnings(), _tolerant_reshape_mapping():
        warnings.simplefilter("ignore")
        ignored = _analyse(candidate, example_input, level, aligned=aligned)
        mods = dict(candidate.named_modules())
        imp = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=1)
        # per-group pruning of grouped convs, whole groups of multiplier convs (aligned only)
        with group_aware_convs(candidate, enabled=aligned) as custom:
            with shuffle_hooks(candidate) as seen:
                pruner = tp.pruner.BasePruner(
                    candidate,
                    example_input,
                    importance=RootSafeImportance(imp) if aligned else imp,
                    pruning_ratio=float(ratio),
                    ignored_layers=[mods[n] for n in ignored],
                    global_pruning=False,
                    pruning_ratio_dict={mods[n]: min(max(float(r), 0.0), 0.95) for n, r in (ratios or {}).items()
                                        if n in mods and n not in ignored} or None,
                    round_to=round_to if round_to > 1 else None,
                    customized_pruners=custom or None,
                )
            if importance == "taylor":
                _taylor_gradients(candidate, example_input, batches, taylor_batches)
            if not aligned:
                pruner.step()
            else:
                prune_aligned(pruner, candidate, seen)
        candidate.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = candidate(example_input)
    if tuple(out.shape) != ref_shape:
        raise RuntimeError(f"output shape changed from {ref_shape} to {tuple(out.shape)}")
    if count_params(candidate) >= params_before:
        raise RuntimeError("no channel could be removed (every layer is ignored or coupled to one)")
    return candidate, ignored


def structured_prune(
    model: nn.Module,
    ratio: float,
    *,
    example_input: torch.Tensor,
    importance: str = "l1",
    batches: Batches | None = None,
    taylor_batches: int = 4,
    finetune: Finetune | None = None,
    finetune_steps: int = 0,
    measure_flops: bool = True,
    calibrate: bool = True,
    tolerance: float = 0.05,
    ratios: dict[str, float] | None = None,
    round_to: int = 1,
    grouped: str = "skip",
) -> tuple[nn.Module, PruneReport]:
    """Channel pruning with torch-pruning on a copy of ``model``; see the module docstring.

    ``ratio`` is the fraction of output channels removed in every prunable layer. Coupled channels
    (a ghost module's cat of a conv and its depthwise twin) make torch-pruning remove more than
    asked; with ``calibrate`` the torch-pruning ratio is searched (at most 4 more runs) so that
    the fraction of channels removed over the non-ignored layers comes within ``tolerance`` of
    ``ratio`` (the closest run is kept).

    ``ratios``: per-group ratios instead (dependency-group root module name -> fraction, from
    :func:`recommender.compress.prune_sensitivity.allocate_ratios`); ``ratio`` is then their
    nominal overall target, and a calibration scales all of them alike. ``round_to``: every
    pruned layer keeps a multiple of this many channels (1 = any count). ``grouped``: ``skip``
    leaves the layers around channel shuffles and (on retries) grouped convs alone; ``aligned``
    prunes them too: grouped convs by as many channels per group, channel-multiplier convs by
    whole groups, shuffles through their permutation (:mod:`.shuffle_prune`).
    """
    t0 = time.perf_counter()
    report = PruneReport(method="structured-channel", target_sparsity=float(ratio))
    was_training = model.training
    report.params_before = count_params(model)
    report.nonzero_before = count_nonzero_params(model)
    if measure_flops:
        f = count_flops(model, tuple(example_input.shape))
        report.mflops_before = None if f is None else f / 1e6
    with torch.no_grad():
        ref_shape = tuple(safe_deepcopy(model).eval()(example_input).shape)
    channels_before = _out_channels(model)

    args = (example_input, importance, batches, taylor_batches, ref_shape, report.params_before)

    def run(r: float, level: int) -> tuple[nn.Module, dict[str, str]]:
        scaled = {k: v * r / ratio for k, v in ratios.items()} if ratios and ratio > 0 else None
        return _attempt(model, r, level, *args, ratios=scaled, round_to=round_to, grouped=grouped)
    pruned: nn.Module | None = None
    failures: list[str] = []
    for level in (0, 1, 2):
        try:
            candidate, ignored = run(ratio, level)
        except Exception as exc:  # torch-pruning raises many kinds of errors on odd graphs
            msg = str(exc).splitlines()[0] if str(exc) else ""
            failures.append(f"level {level}: {type(exc).__name__}: {msg}")
            continue
        skip = set(ignored)
        base = _out_channels(model, skip)

        def achieved(m: nn.Module) -> float:
            return 1.0 - _out_channels(m, skip) / base if base else 0.0

        got, r = achieved(candidate), float(ratio)
        if calibrate and got > ratio + tolerance:
            # coupled channels overshoot: search the torch-pruning ratio (achieved grows with it)
            lo, hi, best = 0.0, float(ratio), (abs(got - ratio), r, candidate, ignored, got)
            g_lo, g_hi = 0.0, got
            for _ in range(4):
                guess = lo + (hi - lo) * (ratio - g_lo) / (g_hi - g_lo) if g_hi > g_lo else (lo + hi) / 2
                guess = min(max(guess, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo))
                try:
                    c2, ig2 = run(guess, level)
                except Exception:
                    break
                g2 = achieved(c2)
                if abs(g2 - ratio) < best[0]:
                    best = (abs(g2 - ratio), guess, c2, ig2, g2)
                if abs(g2 - ratio) <= tolerance:
                    break
                if g2 > ratio:
                    hi, g_hi = guess, g2
                else:
                    lo, g_lo = guess, g2
            _, r, candidate, ignored, got = best
        elif calibrate and 0 < got < ratio - tolerance:
            # undershoot: torch-pruning skips a group whose coupled channels would all go; a
            # smaller ratio can remove more. Scan a few and keep the closest.
            best = (abs(got - ratio), r, candidate, ignored, got)
            for k in (0.8, 0.65, 0.5):
                try:
                    c2, ig2 = run(ratio * k, level)
                except Exception:
                    continue
                g2 = achieved(c2)
                if abs(g2 - ratio) < best[0]:
                    best = (abs(g2 - ratio), ratio * k, c2, ig2, g2)
                if abs(g2 - ratio) <= tolerance:
                    break
            _, r, candidate, ignored, got = best
        pruned = candidate
        report.ignored_layers = ignored
        notes = []
        if r != ratio:
            notes.append(f"torch-pruning ratio scaled to {r:.3f} so that {got:.1%} of the prunable channels go")
        if level > 0:
            notes.append("conservative ignore set after: " + "; ".join(failures))
        report.note = "; ".join(notes)
        break

    if pruned is None:
        pruned = safe_deepcopy(model)
        report.prunable = False
        report.note = "not prunable: " + "; ".join(failures)
    elif finetune is not None and finetune_steps > 0:
        finetune(pruned, finetune_steps)
    pruned.train(was_training)
    report.achieved_sparsity = 1.0 - _out_channels(pruned) / channels_before if channels_before else 0.0
    report.params_after = count_params(pruned)
    report.nonzero_after = count_nonzero_params(pruned)
    if measure_flops:
        f = count_flops(pruned, tuple(example_input.shape))
        report.mflops_after = None if f is None else f / 1e6
    report.size_mb = size_mb(pruned)
    report.sparse_size_mb = sparse_size_mb(pruned)
    report.seconds = time.perf_counter() - t0
    return pruned, report


# ============================================================================================
# configs, registration and entry point

#: Upper bound on unstructured pruning rounds: a tiny ``step`` would otherwise mean millions.
MAX_ROUNDS = 100
IMPORTANCES = ("l1", "taylor")
#: How the structured target is spread over the dependency groups: the same ratio everywhere, or
#: by the trained baseline's per-group sensitivity (:mod:`.prune_sensitivity`).
ALLOCATIONS = ("uniform", "sensitivity")
#: Channel multiples a pruned layer may keep (torch-pruning's ``round_to``; 1 = any count).
ROUND_TO = (1, 8, 16)
#: Fields of :class:`StructuredChannelConfig` serialised only when not at these defaults.
#: What structured pruning does with grouped convs and channel shuffles: ``skip`` leaves the
#: layers around a shuffle alone (as before); ``aligned`` prunes them group-aware
#: (:mod:`.shuffle_prune`).
GROUPED_RULES = ("skip", "aligned")
#: Training batches a sensitivity allocation reads when no measured sensitivity is given (half
#: re-estimate BN statistics, half score; see :func:`sensitivity_from_batches`).
SENSITIVITY_BATCHES = 6
#: Training batches whose gradients score channels for Taylor importance.
TAYLOR_BATCHES = 4


@dataclass(frozen=True)
class NoPruning(MethodConfig):
    """No pruning."""

    @property
    def sparsity(self) -> float:
        return 0.0

    def describe(self) -> str:
        return "no pruning"


@dataclass(frozen=True)
class UnstructuredL1Config(MethodConfig):
    """The paper's iterative global L1 unstructured pruning of conv weights.

    Args:
        sparsity: target fraction of conv weights zeroed, in [0, 1).
        step: fraction of the remaining weights removed per round, in (0, 1) (paper: 0.2); at
            most ``MAX_ROUNDS`` rounds.
        finetune_steps: optimiser steps of recovery training after each round; 0 = the
            protocol's recovery budget (``recovery_epochs``) split over the rounds.
    """

    sparsity: float = 0.0
    step: float = 0.2
    finetune_steps: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_fraction("pruning sparsity", self.sparsity))
        object.__setattr__(self, "step", check_fraction("pruning step", self.step, lo_open=True))
        check_int("finetune_steps", self.finetune_steps)
        if self.rounds > MAX_ROUNDS:
            raise RecommenderError(f"pruning to {self.sparsity:.0%} in steps of {self.step:g} takes "
                                   f"{self.rounds} rounds (at most {MAX_ROUNDS}); use a larger step")

    @property
    def active(self) -> bool:
        return self.sparsity > 0.0

    @property
    def rounds(self) -> int:
        """Pruning rounds to reach ``sparsity`` (each removes ``step`` of what remains)."""
        if self.sparsity <= 0:
            return 0
        return max(1, math.ceil(math.log(1.0 - self.sparsity) / math.log(1.0 - self.step) - 1e-9))

    def describe(self) -> str:
        return f"unstructured-l1 {self.sparsity:.0%}" if self.active else "no pruning"


@dataclass(frozen=True)
class StructuredChannelConfig(MethodConfig):
    """Structured channel pruning with torch-pruning (dependency-aware).

    Args:
        sparsity: fraction of output channels removed per prunable layer, in [0, 1).
        importance: ``l1`` magnitude or ``taylor`` (first-order, needs a few batches).
        finetune_steps: recovery steps after pruning; 0 = the protocol's recovery budget.
        allocation: ``uniform`` (``sparsity`` in every group) or ``sensitivity`` (per-group
            ratios from the trained model's measured sensitivity, the same parameter count).
        round_to: pruned layers keep a multiple of this many channels (1, 8 or 16).
        grouped: ``skip`` (layers around channel shuffles stay whole) or ``aligned`` (grouped
            convs pruned per group, channel-multiplier convs by whole groups, shuffles through
            their permutation: :mod:`.shuffle_prune`; the same result as ``skip`` on a network
            without grouped convs or shuffles).
    """

    sparsity: float = 0.0
    importance: str = "l1"
    finetune_steps: int = 0
    allocation: str = "uniform"
    round_to: int = 1
    grouped: str = "skip"
    # added after recipes were stored: left out of to_dict() at their defaults (old keys unchanged)
    keyed_if_set: ClassVar[tuple[str, ...]] = ("allocation", "round_to", "grouped")

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_fraction("pruning sparsity", self.sparsity))
        if self.importance not in IMPORTANCES:
            raise RecommenderError(f"unknown pruning importance {self.importance!r}; valid: {', '.join(IMPORTANCES)}")
        check_int("finetune_steps", self.finetune_steps)
        if self.allocation not in ALLOCATIONS:
            raise RecommenderError(f"unknown pruning allocation {self.allocation!r}; valid: {', '.join(ALLOCATIONS)}")
        if self.grouped not in GROUPED_RULES:
            raise RecommenderError(f"unknown grouped-conv rule {self.grouped!r}; valid: {', '.join(GROUPED_RULES)}")
        if isinstance(self.round_to, bool) or self.round_to not in ROUND_TO:
            raise RecommenderError(f"pruning round_to must be one of {', '.join(map(str, ROUND_TO))}, "
                                   f"got {self.round_to!r}")

    @property
    def active(self) -> bool:
        return self.sparsity > 0.0

    def batches_needed(self) -> int:
        if self.allocation == "sensitivity":
            return max(TAYLOR_BATCHES if self.importance == "taylor" else 0, SENSITIVITY_BATCHES)
        return TAYLOR_BATCHES if self.importance == "taylor" else 0

    def describe(self) -> str:
        if not self.active:
            return "no pruning"
        extra = (" by sensitivity" if self.allocation == "sensitivity" else "") + \
            (f", channels x{self.round_to}" if self.round_to > 1 else "") + \
            (", group-aligned" if self.grouped == "aligned" else "")
        return f"structured-channel {self.sparsity:.0%}{extra}"


def _report_unpruned(model: nn.Module, cfg: MethodConfig) -> PruneReport:
    rep = PruneReport(method=cfg.method, target_sparsity=float(getattr(cfg, "sparsity", 0.0)), prunable=True,
                      note="no pruning requested")
    rep.params_before = rep.params_after = count_params(model)
    rep.nonzero_before = rep.nonzero_after = count_nonzero_params(model)
    rep.size_mb = size_mb(model)
    rep.sparse_size_mb = sparse_size_mb(model)
    return rep


def apply_pruning(
    model: nn.Module,
    cfg: MethodConfig,
    *,
    example_input: torch.Tensor,
    batches: Batches | None = None,
    finetune: Finetune | None = None,
    finetune_steps: int = 0,
    include_linear: bool = False,
    measure_flops: bool = True,
    sensitivity: Any = None,
) -> tuple[nn.Module, PruneReport]:
    """Prune a copy of ``model`` as ``cfg`` says; returns (pruned model, report).

    ``sensitivity``: the trained ``model``'s :class:`~.prune_sensitivity.PruneSensitivity` for a
    structured config with ``allocation="sensitivity"`` (measured from ``batches`` when None).

    ``example_input``: one input batch (e.g. 1x3x32x32) for graph tracing. ``batches``: (x, y)
    batches for Taylor importance. ``finetune(model, steps)``: optional recovery training;
    ``finetune_steps`` its budget for the whole pruning (used when the config's own
    ``finetune_steps`` is 0). ``include_linear``: unstructured only, also prune Linear weights
    (the paper does not). ``measure_flops``: structured only, fvcore MFLOPs in the report.
    """
    if not cfg.active:
        return model, _report_unpruned(model, cfg)
    if isinstance(cfg, UnstructuredL1Config):
        per_round = cfg.finetune_steps or (math.ceil(finetune_steps / cfg.rounds) if finetune_steps else 0)
        return unstructured_prune(safe_deepcopy(model), cfg.sparsity, step=cfg.step, finetune=finetune,
                                  finetune_steps=per_round, include_linear=include_linear)
    if isinstance(cfg, StructuredChannelConfig):
        ratios = None
        if cfg.allocation == "sensitivity":
            if sensitivity is None:
                sensitivity = sensitivity_from_batches(model, list(batches or []), example_input)
            from .prune_sensitivity import allocate_ratios

            ratios = allocate_ratios(sensitivity, cfg.sparsity)
        pruned, rep = structured_prune(model, cfg.sparsity, example_input=example_input, importance=cfg.importance,
                                       batches=batches, finetune=finetune,
                                       finetune_steps=cfg.finetune_steps or finetune_steps,
                                       measure_flops=measure_flops, ratios=ratios, round_to=cfg.round_to,
                                       grouped=cfg.grouped, calibrate=ratios is None)
        return pruned, rep
    return get_method("prune", cfg.method).apply(
        model, cfg, CompressContext(example_input, list(batches) if batches else None, finetune, finetune_steps))


def sensitivity_from_batches(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                             example_input: torch.Tensor) -> Any:
    """The per-group sensitivity of ``model`` measured on ``batches`` (the first half re-estimates
    the BN statistics, the second half scores), for a sensitivity allocation applied without a
    measured one (``recommend apply``, a direct call). A study measures it once instead
    (:meth:`recommender.evaluation.Evaluator.prune_sensitivity`)."""
    from .prune_sensitivity import measure_sensitivity

    if len(batches) < 2:
        raise RecommenderError(f"a sensitivity allocation needs at least 2 training batches "
                               f"({SENSITIVITY_BATCHES} by default), got {len(batches)}")
    half = len(batches) // 2
    return measure_sensitivity(model, batches[:half], batches[half:], example_input)


def _apply(model: nn.Module, cfg: MethodConfig, ctx: CompressContext) -> tuple[nn.Module, PruneReport]:
    return apply_pruning(model, cfg, example_input=ctx.example_input, batches=ctx.batches, finetune=ctx.finetune,
                         finetune_steps=ctx.finetune_steps, measure_flops=False, sensitivity=ctx.sensitivity)


def _conv_weights(model: nn.Module) -> int:
    return sum(getattr(m, n).numel() for m, n in prunable_tensors(model))


def _estimate_unstructured(model: nn.Module, cfg: MethodConfig, costs: StructureCosts,
                           ctx: CompressContext) -> tuple[nn.Module, StructureCosts]:
    # exactly round(sparsity * conv weights) zeros; params, FLOPs and the dense size stay
    zeroed = round(cfg.sparsity * _conv_weights(model)) if cfg.active else 0
    return model, StructureCosts(costs.params, max(0.0, costs.nonzero_params - zeroed), costs.mflops,
                                 costs.size_mb, costs.notes)


def _estimate_structured(model: nn.Module, cfg: MethodConfig, costs: StructureCosts,
                         ctx: CompressContext) -> tuple[nn.Module, StructureCosts]:
    # channel counts do not depend on the weights: prune the untrained structure (L1) and measure
    if not cfg.active:
        return model, costs
    from ..shape_costs import count_flops_shapes

    # a sensitivity allocation keeps the uniform ratio's parameter count (allocate_ratios), so the
    # uniform structure stands for it here
    pruned, rep = structured_prune(model, cfg.sparsity, example_input=ctx.example_input, importance="l1",
                                   measure_flops=False, round_to=getattr(cfg, "round_to", 1),
                                   grouped=getattr(cfg, "grouped", "skip"))
    f = None
    if costs.mflops is not None:  # fvcore's count from the shapes, in milliseconds (fvcore itself: seconds)
        f = count_flops_shapes(pruned, tuple(ctx.example_input.shape))
        f = count_flops(pruned, tuple(ctx.example_input.shape)) if f is None else f
    n = count_params(pruned)
    notes = list(costs.notes) + ([rep.note] if rep.note and not rep.prunable else [])
    return pruned, StructureCosts(n, n, None if f is None else f / 1e6, size_mb(pruned), notes)


#: The quick lower bound of structured pruning (no torch-pruning run, no weights) is the larger
#: of two counts. (1) ``GLOBAL_SHARE`` x (1 - sparsity)**2 of the structure's params, FLOPs and
#: size: torch-pruning removes about ``sparsity`` of each prunable layer's output channels (the
#: calibration only lowers its ratio), so a layer keeps about (1 - sparsity)**2 of its weights.
#: (2) ``LAYER_SHARE`` x a per-layer count in which each conv/linear/BN keeps (1 - sparsity) of its
#: input and output channels but at least one, and the network's input channels and class scores
#: whole: in a small network rounding and the kept ends dominate. Coupled channels (ghost
#: modules) let some layers lose more than ``sparsity``; the margins cover that, measured against
#: torch-pruning on the presets and random points of the bundled spaces (worst: 0.77 of the
#: per-layer count, 0.985 of the global one; tests/test_structure.py checks the bound).
GLOBAL_SHARE = 0.9
LAYER_SHARE = 0.7


def _keep(model: nn.Module, cfg: MethodConfig, costs: StructureCosts,
          ctx: CompressContext) -> tuple[nn.Module, StructureCosts]:
    return model, costs


def _kept(c: int, share: float, fixed: bool) -> float:
    return float(c) if fixed else max(1.0, c * share)


def _layer_bound(model: nn.Module, share: float, num_inputs: int, num_outputs: int) -> tuple[float, float]:
    """(params, share of the weights kept) of ``model``'s conv/linear/BN layers when each keeps
    ``share`` of its input and output channels (at least one), except the network's input
    channels and its class scores; other parameters are kept whole."""
    kept = total = 0.0
    covered: set[int] = set()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            c_in, c_out = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
            groups = m.groups if isinstance(m, nn.Conv2d) else 1
            k = m.weight.numel() // max(1, c_out * (c_in // groups))
            o = _kept(c_out, share, c_out == num_outputs and isinstance(m, nn.Linear))
            if groups > 1 and groups == c_in == c_out:  # depthwise: one input channel per output
                w = o * k
            else:
                i = _kept(c_in, share, c_in == num_inputs)
                w = o * max(1.0, i / groups) * k
            kept += w + (o if m.bias is not None else 0.0)
            total += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
            covered |= {id(m.weight)} | ({id(m.bias)} if m.bias is not None else set())
        elif isinstance(m, nn.BatchNorm2d) and m.weight is not None:
            o = _kept(m.num_features, share, False)
            kept += 2 * o
            total += 2 * m.num_features
            covered |= {id(m.weight), id(m.bias)}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in covered and p.requires_grad)
    return kept + rest, (kept + rest) / max(1.0, total + rest)


def _bound_structured(model: nn.Module, cfg: MethodConfig, costs: StructureCosts,
                      ctx: CompressContext) -> tuple[nn.Module, StructureCosts]:
    # a lower bound from the layers' channel counts alone (no torch-pruning run, no weights)
    if not cfg.active:
        return model, costs
    num_inputs = int(ctx.example_input.shape[1])
    head = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    num_outputs = (head[-1].out_features if isinstance(head[-1], nn.Linear) else head[-1].out_channels) if head else -1
    if getattr(cfg, "round_to", 1) > 1 or getattr(cfg, "grouped", "skip") != "skip":
        # rounding kept channels down to a multiple, or whole rounds of a group-aware selection,
        # may remove far more than ``sparsity`` of a narrow layer, but never all of its channels:
        # one channel per layer is the safe bound (the estimate screens)
        params, _ = _layer_bound(model, 0.0, num_inputs, num_outputs)
        params = min(params, costs.params)
        return model, StructureCosts(params, min(params, costs.nonzero_params),
                                     None if costs.mflops is None else 0.0, 0.0, costs.notes)
    share = 1.0 - cfg.sparsity
    params, frac = _layer_bound(model, share, num_inputs, num_outputs)
    k = max(GLOBAL_SHARE * share ** 2, LAYER_SHARE * min(frac, 1.0))
    params = min(max(GLOBAL_SHARE * share ** 2 * costs.params, LAYER_SHARE * params), costs.params)
    # the dense size follows the weights; FLOPs scale with input x output channels of each layer
    return model, StructureCosts(params, min(params, costs.nonzero_params),
                                 None if costs.mflops is None else costs.mflops * GLOBAL_SHARE * share ** 2,
                                 costs.size_mb * min(k, 1.0), costs.notes)


register_method("none", "prune", NoPruning, lowers=set(), apply=_apply, estimate=_keep, bound=_keep,
                description="no pruning")
register_method("unstructured-l1", "prune", UnstructuredL1Config, lowers={"nonzero-params"}, apply=_apply,
                estimate=_estimate_unstructured, bound=_estimate_unstructured,
                description="the paper's iterative global L1 unstructured pruning of conv weights")
register_method("structured-channel", "prune", StructuredChannelConfig,
                lowers={"params", "nonzero-params", "flops", "size", "latency"}, apply=_apply,
                estimate=_estimate_structured, bound=_bound_structured,
                description="torch-pruning dependency-aware channel pruning (L1 or Taylor)")
