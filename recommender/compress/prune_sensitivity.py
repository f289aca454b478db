"""Per-group pruning sensitivity of a trained network, and per-group ratios allocated from it.

``measure_sensitivity(model, calib, score, example_input) -> PruneSensitivity``: for every prunable
dependency group of torch-pruning's :class:`DependencyGraph` (a conv or linear layer's output
channels together with every layer coupled to them: the BN after it, the input channels of its
consumers, a residual stream's other producers), the accuracy on ``score`` images when that group
alone loses ``ratio`` of its channels (lowest L1 first, as the pruner ranks them), after
re-estimating the BatchNorm statistics on ``calib`` images (adaptive BN, EagleEye, ECCV 2020).

Pruning a group is simulated by zeroing the parameters of the channels it would remove (the
weight rows and biases of every coupled conv/linear and the scale and shift of every coupled BN):
a zero channel contributes nothing to its consumers, so the network computes what the pruned one
computes, without rebuilding the dependency graph for every (group, ratio). The groups and the
layers left alone are those of :func:`recommender.compress.prune.structured_prune` (its level-0
ignore set), so a group here is a group the pruner can prune.

``allocate_ratios(sensitivity, target) -> {group root: ratio}``: less sensitive groups are pruned
more, keeping the parameter count that the uniform ``target`` ratio leaves (within rounding).
Groups are thresholded on their interpolated accuracy-drop curve (the largest ratio whose drop
stays under a common threshold, as in Distiller's sensitivity pruning); the threshold is
bisected, and the two allocations around the discontinuity are blended, to meet the count.

``recalibrate_bn`` is also the BN re-estimation of the rung-0 screen
(``benchmarks/rung0_screen.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..errors import RecommenderError

__all__ = ["GroupSensitivity", "PruneSensitivity", "SensitivityConfig", "measure_sensitivity",
           "allocate_ratios", "recalibrate_bn", "accuracy_on", "kept_params", "sensitivity_name"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SensitivityConfig:
    """How the sensitivity is measured.

    Args:
        ratios: fractions of a group's channels removed, each in (0, 1).
        calib_batches: training batches whose images re-estimate the BN statistics.
        score_batches: further training batches (not the calibration ones) the accuracy is
            measured on; validation images are never used, so the search does not tune on them.
    """

    # two ratios and 3 + 3 batches of 64: one (group, ratio) point is ~400 forward images, so
    # ResNet-101's ~70 groups take minutes on 2 cores; measured once per study and cached
    ratios: tuple[float, ...] = (0.3, 0.6)
    calib_batches: int = 3
    score_batches: int = 3

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0.0 < r < 1.0 for r in self.ratios):
            raise RecommenderError(f"sensitivity ratios must be in (0, 1), got {self.ratios!r}")
        if self.calib_batches < 1 or self.score_batches < 1:
            raise RecommenderError("sensitivity needs at least one calibration and one scoring batch")
        object.__setattr__(self, "ratios", tuple(sorted(float(r) for r in self.ratios)))

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class GroupSensitivity:
    """One dependency group: ``root`` (the conv/linear layer whose output channels root the group,
    by module name, as :class:`torch_pruning.pruner.BasePruner` keys its per-layer ratios),
    ``layers`` (every conv/linear/BN it touches), ``channels`` (its prunable channels),
    ``ratios`` and the ``accuracy`` (fraction in [0, 1]) at each."""

    root: str
    layers: tuple[str, ...]
    channels: int
    ratios: tuple[float, ...]
    accuracy: tuple[float, ...]

    def drops_pp(self, base: float) -> list[float]:
        """Accuracy drop (percentage points, positive = worse) at each ratio."""
        return [100.0 * (base - a) for a in self.accuracy]


@dataclass
class PruneSensitivity:
    """The result of :func:`measure_sensitivity`: ``base_accuracy`` (fraction, the unpruned
    network after the same BN re-estimation, on the same images), ``groups``, ``images``
    (calibration / scoring image counts), ``seconds`` of measurement, ``params`` (module name ->
    parameter count, for :func:`kept_params`), and ``couplings`` (module name -> [group root of
    its output channels, group root of its input channels], either may be None)."""

    base_accuracy: float
    groups: list[GroupSensitivity]
    calib_images: int = 0
    score_images: int = 0
    seconds: float = 0.0
    params: dict[str, int] = field(default_factory=dict)
    couplings: dict[str, list[str | None]] = field(default_factory=dict)
    depthwise: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneSensitivity":
        groups = [GroupSensitivity(g["root"], tuple(g["layers"]), int(g["channels"]), tuple(g["ratios"]),
                                   tuple(g["accuracy"])) for g in d["groups"]]
        return cls(float(d["base_accuracy"]), groups, int(d.get("calib_images", 0)), int(d.get("score_images", 0)),
                   float(d.get("seconds", 0.0)), {k: int(v) for k, v in d.get("params", {}).items()},
                   {k: list(v) for k, v in d.get("couplings", {}).items()}, list(d.get("depthwise", [])))

    def most_sensitive(self, k: int = 5, ratio: float | None = None) -> list[tuple[str, float]]:
        """The ``k`` groups that lose most accuracy at ``ratio`` (default: the largest measured),
        as (root, drop in pp): the layers that matter, for the explanation."""
        out = []
        for g in self.groups:
            r = ratio if ratio is not None else g.ratios[-1]
            out.append((g.root, _drop_at(g, self.base_accuracy, r)))
        return sorted(out, key=lambda t: -t[1])[:k]


    def summary(self, k: int = 5) -> dict[str, Any]:
        """The layers that matter, for the explanation: the ``k`` groups that lose most accuracy
        at the largest measured ratio (drop in pp, BN re-estimated, on ``score_images`` training
        images), with what the figures are measured on."""
        ratio = max((max(g.ratios) for g in self.groups), default=0.0)
        return {"ratio": ratio, "base_accuracy": self.base_accuracy, "images": self.score_images,
                "calib_images": self.calib_images, "groups": len(self.groups),
                "layers": [{"layer": n, "drop_pp": round(d, 2)} for n, d in self.most_sensitive(k, ratio)]}


def sensitivity_name(cfg: SensitivityConfig) -> str:
    """File stem under which a study's cache keeps the sensitivity (next to the baseline's weights,
    whose key already names the checkpoint, the dataset and the protocol)."""
    return f"prune_sensitivity_{cfg.key()}"


# ============================================================================================
# BN re-estimation and scoring


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``images`` (a cumulative average
    over the batches, ``momentum=None``), in place; everything else runs in eval mode (dropout
    off). The model's training mode and the BN momenta are restored. Returns the model."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in images:
            model(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return model


@torch.no_grad()
def accuracy_on(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode on ``batches``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).flatten(1).argmax(1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    return correct / total if total else 0.0


# ============================================================================================
# groups and masking


def _is_out_fn(dg: Any, fn: Any) -> bool:
    return dg.is_out_channel_pruning_fn(fn)


def _groups(model: nn.Module, example_input: torch.Tensor) -> tuple[Any, list[Any], dict[str, str]]:
    """torch-pruning's dependency graph of ``model``, its prunable groups (those the structured
    pruner would prune, after its level-0 ignore set) and that ignore set."""
    import torch_pruning as tp

    from .prune import _analyse, _tolerant_reshape_mapping

    with warnings.catch_warnings(), _tolerant_reshape_mapping():
        warnings.simplefilter("ignore")
        ignored = _analyse(model, example_input, 0)
        mods = dict(model.named_modules())
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        groups = list(dg.get_all_groups(ignored_layers=[mods[n] for n in ignored],
                                        root_module_types=[nn.Conv2d, nn.Linear]))
    return dg, groups, ignored


def _root(group: Any) -> nn.Module:
    return group[0][0].target.module


def _zero_channels(dg: Any, group: Any, names: dict[nn.Module, str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero the output channels ``group`` removes in every coupled conv/linear/BN; returns
    (tensor, saved copy) pairs to restore them."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for dep, idxs in group:
        m = dep.target.module
        if not _is_out_fn(dg, dep.handler) or not isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            continue
        idx = torch.as_tensor(list(idxs), dtype=torch.long)
        if idx.numel() == 0:
            continue
        for p in (m.weight, m.bias):
            if p is None:
                continue
            saved.append((p.data, p.data.clone()))
            p.data[idx] = 0
    return saved


def _module_couplings(dg: Any, groups: list[Any], names: dict[nn.Module, str]
                      ) -> dict[str, list[str | None]]:
    """module name -> [root of the group that prunes its output channels, root of the group that
    prunes its input channels]."""
    out: dict[str, list[str | None]] = {}
    for g in groups:
        root = names[_root(g)]
        for dep, _ in g:
            m = dep.target.module
            if m not in names or not isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                continue
            slot = 0 if _is_out_fn(dg, dep.handler) else 1
            out.setdefault(names[m], [None, None])[slot] = root
    return out


def measure_sensitivity(model: nn.Module, calib: Sequence[Batch], score: Sequence[Batch], example_input: torch.Tensor,
                        *, ratios: Sequence[float] = SensitivityConfig.ratios) -> PruneSensitivity:
    """Accuracy of ``model`` on ``score`` with each prunable group alone pruned at each of
    ``ratios`` (lowest-L1 channels of the group first), BN re-estimated on ``calib`` images each
    time; see the module docstring. ``model`` is not modified (a copy is used)."""
    import torch_pruning as tp

    from ..measure import safe_deepcopy

    t0 = time.perf_counter()
    net = safe_deepcopy(model).eval()
    names = {m: n for n, m in net.named_modules()}
    dg, groups, _ = _groups(net, example_input)
    calib_x = [x for x, _ in calib]
    bn_state = {k: v.clone() for k, v in net.state_dict().items() if "running_" in k or "num_batches" in k}

    def score_now() -> float:
        recalibrate_bn(net, calib_x)
        acc = accuracy_on(net, score)
        net.load_state_dict(bn_state, strict=False)
        return acc

    base = score_now()
    imp_fn = tp.importance.MagnitudeImportance(p=1)
    out: list[GroupSensitivity] = []
    ratios = tuple(sorted(float(r) for r in ratios))
    for g in groups:
        root = _root(g)
        root_fn = g[0][0].handler
        with torch.no_grad():
            imp = imp_fn(g)
        if imp is None:
            continue
        n = int(imp.numel())
        order = torch.argsort(imp)
        accs = []
        for r in ratios:
            k = n - int(n * (1.0 - r))  # as torch-pruning's local pruning counts
            if k <= 0 or k >= n:
                accs.append(base if k <= 0 else 0.0)
                continue
            sub = dg.get_pruning_group(root, root_fn, order[:k].tolist())
            saved = _zero_channels(dg, sub, names)
            try:
                accs.append(score_now())
            finally:
                for t, s in saved:
                    t.copy_(s)
        layers = tuple(sorted({names[d.target.module] for d, _ in g if d.target.module in names}))
        out.append(GroupSensitivity(names[root], layers, n, ratios, tuple(accs)))
    params = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in net.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))}
    depthwise = [n for n, m in net.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels]
    return PruneSensitivity(base, out, sum(int(x.shape[0]) for x in calib_x), sum(int(y.numel()) for _, y in score),
                            time.perf_counter() - t0, params, _module_couplings(dg, groups, names), depthwise)


# ============================================================================================
# allocation


def _drop_at(g: GroupSensitivity, base: float, r: float) -> float:
    """Interpolated accuracy drop (pp) of ``g`` at ratio ``r``: piecewise linear through (0, 0)
    and the measured points, made non-decreasing, extrapolated with the last segment's slope."""
    xs = [0.0, *g.ratios]
    ys = [0.0]
    for d in g.drops_pp(base):
        ys.append(max(ys[-1], d))
    if r <= 0:
        return 0.0
    for i in range(1, len(xs)):
        if r <= xs[i]:
            t = (r - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + slope * (r - xs[-1])


def _ratio_under(g: GroupSensitivity, base: float, threshold: float, max_ratio: float, steps: int = 64) -> float:
    """The largest ratio in [0, max_ratio] whose interpolated drop is at most ``threshold``."""
    lo, hi = 0.0, max_ratio
    if _drop_at(g, base, hi) <= threshold:
        return hi
    if _drop_at(g, base, 1e-9) > threshold:
        return 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if _drop_at(g, base, mid) <= threshold:
            lo = mid
        else:
            hi = mid
    return lo


def kept_params(sens: PruneSensitivity, ratios: dict[str, float]) -> float:
    """Parameters of the conv/linear/BN layers left when each group loses ``ratios[root]`` of its
    channels: a layer keeps (1 - its output group's ratio) x (1 - its input group's ratio) of its
    parameters (one factor for BN and depthwise convs, whose input is their output)."""
    total = 0.0
    dw = set(sens.depthwise)
    for name, n in sens.params.items():
        g_out, g_in = sens.couplings.get(name, [None, None])
        k = 1.0 - ratios.get(g_out, 0.0) if g_out else 1.0
        if g_in and name not in dw:
            k *= 1.0 - ratios.get(g_in, 0.0)
        total += n * k
    return total


def allocate_ratios(sens: PruneSensitivity, target: float, *, max_ratio: float = 0.85,
                    tolerance: float = 0.002) -> dict[str, float]:
    """Per-group pruning ratios (group root -> fraction) that keep :func:`kept_params` of the
    uniform ``target`` ratio (relative ``tolerance``), less sensitive groups pruned more.

    ``max_ratio``: no group loses more than this fraction of its channels (the measured curves
    are extrapolated beyond their largest ratio, so keep it near it)."""
    if not 0.0 <= target < 1.0:
        raise RecommenderError(f"pruning target must be in [0, 1), got {target!r}")
    groups = sens.groups
    if not groups or target == 0.0:
        return {g.root: target for g in groups}
    max_ratio = max(max_ratio, target)
    goal = kept_params(sens, {g.root: target for g in groups})
    base = sens.base_accuracy

    def alloc(th: float) -> dict[str, float]:
        return {g.root: _ratio_under(g, base, th, max_ratio) for g in groups}

    drops = [_drop_at(g, base, r) for g in groups for r in (1e-9, max_ratio)]
    lo, hi = min(drops) - 1.0, max(drops) + 1.0  # kept(lo) >= goal >= kept(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if kept_params(sens, alloc(mid)) > goal:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    a, b = alloc(lo), alloc(hi)  # a keeps more than the goal, b at most the goal
    # the threshold moves whole groups at once where curves are flat: blend the two allocations
    wlo, whi = 0.0, 1.0
    mix = b
    for _ in range(40):
        w = (wlo + whi) / 2
        mix = {k: (1 - w) * a[k] + w * b[k] for k in a}
        kept = kept_params(sens, mix)
        if abs(kept - goal) <= tolerance * goal:
            break
        if kept > goal:
            wlo = w
        else:
            whi = w
    return mix
