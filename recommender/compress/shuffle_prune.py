"""Structured pruning through grouped convolutions and channel shuffles (``grouped="aligned"``).

torch-pruning 1.6 gets three things wrong in the shuffle presets (ResNet 5, 13, 14; VGG 8, 12, 13):

- it traces a channel shuffle (``view(n, g, c/g, h, w) -> transpose(1, 2) -> reshape``,
  :class:`recommender.models.blocks.ChannelShuffle`) as reshapes around an element-wise op, so it
  maps channel ``i`` before the shuffle to channel ``i`` after it;
- it prunes a grouped convolution's input channels at the same positions in every group (it
  keeps the first ``in/g`` input slices of the weight);
- it has no coupling for a channel-multiplier conv (``groups == in_channels``, ``k > 1`` outputs
  per input: the fire module's expand3, Fire-B/C): it indexes a missing input slice and raises
  ``IndexError``.

:func:`recommender.compress.prune.structured_prune` therefore leaves every layer around a shuffle
alone by default (``grouped="skip"``), and those presets lose almost nothing. With
``grouped="aligned"`` instead:

1. every :class:`ChannelShuffle` is located in torch-pruning's dependency graph (by the autograd
   node of its output, recorded by a forward hook while the graph is traced), and the edges across
   its transpose map channels through the shuffle's permutation (:class:`PermutationMapping`),
   kept up to date as channels go. A shuffle may lose any channels: where its groups lost
   different positions it becomes the equivalent :class:`~recommender.models.blocks.ChannelPermute`
   (one ``index_select``), otherwise it stays a shuffle (:func:`finish_shuffles`);
2. grouped convs get a pruner that removes input channels per group
   (:class:`GroupedConvPruner`), so every group only has to lose as many as the others; a
   channel-multiplier conv loses **whole groups** (:class:`MultiplierConvPruner`, input ``i`` is
   outputs ``i*k .. i*k+k-1``, mapped by :func:`map_multipliers`);
3. each pruning group the pruner proposes is checked (:func:`group_ok`: equal counts per group of
   a grouped conv, whole groups of a multiplier conv); one that fails is re-selected by
   :func:`aligned_indices`: channels are bundled into classes "block ``l`` of size ``s`` in each
   of ``G`` equal chunks" of the root layer, for the smallest class size whose selection passes
   the check, and the least important classes (summed L1 importance) go.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch_pruning.pruner import function

__all__ = [
    "ShuffleState", "PermutationMapping", "shuffle_hooks", "map_shuffles", "finish_shuffles",
    "GroupedConv2d", "MultiplierConv2d", "GroupedConvPruner", "MultiplierConvPruner", "group_aware_convs",
    "map_multipliers", "RootSafeImportance", "prune_group", "group_ok", "balanced_indices", "aligned_indices",
    "prune_aligned",
]


# -------------------------------------------------------------------------------------------
# channel shuffles


@dataclass(eq=False)
class ShuffleState:
    """One traced call of a :class:`ChannelShuffle` of ``channels`` channels in ``groups`` groups,
    and which of its original channels are still there, before (``pre``) and after (``post``)."""

    channels: int
    groups: int
    module: nn.Module
    pre: list[int] = field(default_factory=list)
    post: list[int] = field(default_factory=list)
    nodes: tuple[Any, Any] | None = None  # torch-pruning nodes (transpose, its output)

    def __post_init__(self) -> None:
        self.pre = self.pre or list(range(self.channels))
        self.post = self.post or list(range(self.channels))
        self._positions()

    def _positions(self) -> None:
        self.pre_pos = {c: i for i, c in enumerate(self.pre)}
        self.post_pos = {c: i for i, c in enumerate(self.post)}

    def forward(self, c: int) -> int:
        """Original channel ``c`` before the shuffle -> its original position after it."""
        per = self.channels // self.groups
        return (c % per) * self.groups + c // per

    def backward(self, c: int) -> int:
        per = self.channels // self.groups
        return (c % self.groups) * per + c // self.groups

    def remove(self, pre_idxs: list[int]) -> None:
        """Drop the channels at current positions ``pre_idxs`` before the shuffle (and their images
        after it)."""
        gone = {self.pre[i] for i in pre_idxs}
        self.pre = [c for c in self.pre if c not in gone]
        after = {self.forward(c) for c in gone}
        self.post = [c for c in self.post if c not in after]
        self._positions()

    def index(self) -> list[int]:
        """Current output channel ``j`` is current input channel ``index()[j]``."""
        return [self.pre_pos[self.backward(c)] for c in self.post]


class PermutationMapping:
    """torch-pruning index mapping across a shuffle's transpose: current channels before ->
    after (``reverse=False``) or after -> before, through :class:`ShuffleState`."""

    def __init__(self, state: ShuffleState, reverse: bool = False):
        self.state, self.reverse = state, reverse

    def __call__(self, idxs: list[Any]) -> list[Any]:
        from torch_pruning import _helpers

        st = self.state
        if self.reverse:
            new = [st.pre_pos[st.backward(st.post[i.idx])] for i in idxs]
        else:
            new = [st.post_pos[st.forward(st.pre[i.idx])] for i in idxs]
        return [_helpers._HybridIndex(idx=j, root_idx=i.root_idx) for i, j in zip(idxs, new)]


@contextlib.contextmanager
def shuffle_hooks(model: nn.Module) -> Iterator[dict[Any, ShuffleState]]:
    """While active, every :class:`ChannelShuffle` forward records ``output.grad_fn ->``
    :class:`ShuffleState` in the yielded dict (trace the dependency graph inside it)."""
    from ..models.blocks import ChannelShuffle

    seen: dict[Any, ShuffleState] = {}

    def hook(mod: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if mod.groups > 1 and output.grad_fn is not None:
            seen[output.grad_fn] = ShuffleState(int(output.shape[1]), int(mod.groups), mod)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ChannelShuffle)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _transpose_of(node: Any) -> tuple[Any, Any] | None:
    """(transpose node, its output node) on the path into a shuffle's final reshape ``node``."""
    stack, seen = list(node.inputs), set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        gf = getattr(n, "grad_fn", None)
        if gf is not None and hasattr(gf, "name") and "transpose" in gf.name().lower():
            return n, (n.outputs[0] if n.outputs else None)
        if len(seen) < 4:  # reshape <- clone <- transpose: a few steps up at most
            stack.extend(n.inputs)
    return None


def map_shuffles(dg: Any, seen: dict[Any, ShuffleState]) -> dict[int, ShuffleState]:
    """Give the edges across every recorded shuffle's transpose its :class:`PermutationMapping`;
    returns {id(node before the transpose): state}."""
    pre: dict[int, ShuffleState] = {}
    for node in list(dg.module2node.values()):
        st = seen.get(getattr(node, "grad_fn", None))
        if st is None:
            continue
        found = _transpose_of(node)
        if found is None or found[1] is None:
            continue
        t, after = found
        # the shuffle's own reshapes keep channel indices (the permutation is on the transpose's
        # edges); torch-pruning's shape inference would give them a flatten mapping where a
        # shuffle feeds a concatenation (ghost modules): drop it and keep it from coming back
        reshapes = [node, *[n for n in t.inputs if n.type == _reshape_type()]]
        skip = getattr(dg, "_shuffle_reshapes", set())
        for r in reshapes:
            skip.add(id(r))
            for dep in r.dependencies:
                dep.index_mapping[0] = None
            for other in [*r.inputs, *r.outputs]:
                for dep in other.dependencies:
                    if dep.target is r:
                        dep.index_mapping[0] = None
        dg._shuffle_reshapes = skip
        for dep in t.dependencies:
            if dep.target is after:
                dep.index_mapping[0] = PermutationMapping(st)
        for dep in after.dependencies:
            if dep.target is t:
                dep.index_mapping[0] = PermutationMapping(st, reverse=True)
        st.nodes = (t, after)
        pre[id(t)] = st
        for n in t.inputs:
            pre[id(n)] = st
    return pre


def finish_shuffles(model: nn.Module, states: list[ShuffleState]) -> int:
    """Replace every pruned shuffle whose groups lost different positions by the equivalent
    :class:`~recommender.models.blocks.ChannelPermute`; returns how many were replaced. Raises
    when one shuffle module was traced at two places that were pruned differently."""
    from ..models.blocks import ChannelPermute, channel_shuffle

    parents = {id(m): (parent, name) for parent in model.modules() for name, m in parent.named_children()}
    done: dict[int, list[int]] = {}
    for st in states:
        if len(st.pre) == st.channels:
            continue
        index = st.index()
        if id(st.module) in done:
            if done[id(st.module)] != index:
                raise RuntimeError("a channel shuffle used at two places was pruned differently")
            continue
        done[id(st.module)] = index
        c, g = len(index), st.groups
        if c % g == 0:  # still a g-group shuffle of c channels: keep the cheaper view/transpose
            regular = channel_shuffle(torch.arange(c, dtype=torch.float).view(1, c, 1, 1), g).flatten()
            if regular.long().tolist() == index:
                continue
        parent, name = parents[id(st.module)]
        setattr(parent, name, ChannelPermute(index))
    return sum(1 for st in states if id(st.module) in done)


def _reshape_type() -> Any:
    import torch_pruning as tp

    return tp.ops.OPTYPE.RESHAPE


# -------------------------------------------------------------------------------------------
# grouped and channel-multiplier convs


class GroupedConv2d(nn.Conv2d):
    """Marks a grouped conv (``1 < groups``, neither depthwise nor a channel multiplier) while it
    is pruned, so that torch-pruning looks up :class:`GroupedConvPruner` for it."""


class MultiplierConv2d(nn.Conv2d):
    """Marks a channel-multiplier conv (``groups == in_channels``, ``out = k * in``, ``k > 1``)
    while it is pruned, so that torch-pruning looks up :class:`MultiplierConvPruner` for it."""


def is_multiplier(m: nn.Module) -> bool:
    """A conv with one input channel per group and ``k > 1`` outputs per group."""
    return (isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
            and m.out_channels > m.in_channels and m.out_channels % m.groups == 0)


def is_grouped(m: nn.Module) -> bool:
    """A grouped conv with several input channels per group."""
    return isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels


def _per_group(idxs: list[int], channels: int, groups: int) -> list[list[int]]:
    """Kept positions within each group after removing ``idxs``."""
    per = channels // groups
    drop = set(idxs)
    return [[j for j in range(per) if k * per + j not in drop] for k in range(groups)]


class GroupedConvPruner(function.ConvPruner):
    """Removes a grouped conv's input channels per group: each group's output rows keep their own
    group's remaining inputs, so the groups must lose as many channels each, not the same ones."""

    def prune_in_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        g = layer.groups
        keeps = _per_group([int(i) for i in idxs], layer.in_channels, g)
        if len({len(k) for k in keeps}) != 1 or not keeps[0]:
            raise RuntimeError(f"a {g}-group conv must lose as many input channels from every group")
        rows = layer.out_channels // g
        w = layer.weight.detach()
        layer.weight = nn.Parameter(torch.cat([w[k * rows:(k + 1) * rows][:, keeps[k]] for k in range(g)], 0))
        layer.in_channels = g * len(keeps[0])
        return layer


class MultiplierConvPruner(function.ConvPruner):
    """Removes whole groups of a channel-multiplier conv. Its input and output channels are one
    index space (the output channels; input ``i`` is outputs ``i*k .. i*k+k-1``), so pruning
    either prunes both, as torch-pruning does for depthwise convs."""

    def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        k = layer.out_channels // layer.groups
        drop = set(int(i) for i in idxs)
        kept = [g for g in range(layer.groups) if not all(g * k + j in drop for j in range(k))]
        keep = [g * k + j for g in kept for j in range(k)]
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.out_channels, layer.in_channels, layer.groups = len(keep), len(kept), len(kept)
        return layer

    prune_in_channels = prune_out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channel_groups(self, layer: nn.Module) -> int:
        return 1

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return 1


@contextlib.contextmanager
def group_aware_convs(model: nn.Module, enabled: bool = True) -> Iterator[dict[Any, Any]]:
    """While active, the grouped convs of ``model`` are :class:`GroupedConv2d` and its
    channel-multiplier convs :class:`MultiplierConv2d` (same parameters; plain ``nn.Conv2d``
    again on exit); yields torch-pruning's ``customized_pruners`` for them (empty when there are
    none or ``enabled`` is false)."""
    marked: list[nn.Module] = []
    for m in model.modules():
        if enabled and type(m) is nn.Conv2d and (is_multiplier(m) or is_grouped(m)):
            m.__class__ = MultiplierConv2d if is_multiplier(m) else GroupedConv2d
            marked.append(m)
    try:
        yield {MultiplierConv2d: MultiplierConvPruner(), GroupedConv2d: GroupedConvPruner()} if marked else {}
    finally:
        for m in marked:
            m.__class__ = nn.Conv2d


class _GroupMapping:
    """torch-pruning index mapping across a multiplier conv with ``k`` outputs per input:
    input ``i`` -> outputs ``i*k .. i*k+k-1``, or (``reverse``) outputs -> the inputs whose whole
    group is among them."""

    def __init__(self, k: int, reverse: bool = False):
        self.k, self.reverse = k, reverse

    def __call__(self, idxs: list[Any]) -> list[Any]:
        from torch_pruning import _helpers

        k = self.k
        if not self.reverse:
            return [_helpers._HybridIndex(idx=i.idx * k + j, root_idx=i.root_idx) for i in idxs for j in range(k)]
        have = {i.idx for i in idxs}
        return [_helpers._HybridIndex(idx=i.idx // k, root_idx=i.root_idx) for i in idxs
                if i.idx % k == 0 and all(i.idx + j in have for j in range(k))]


def map_multipliers(dg: Any) -> tuple[int, ...]:
    """Give the edges between every :class:`MultiplierConv2d` and its producers the group mapping
    (slot 1 of torch-pruning's two: slot 0 may hold a reshape's mapping, slot 1 is only used on a
    concatenation's own edges); returns the multipliers ``k`` found (class sizes to try)."""
    ks: set[int] = set()
    for m, node in dg.module2node.items():
        if not isinstance(m, MultiplierConv2d):
            continue
        k = m.out_channels // m.groups
        ks.add(k)
        for dep in node.dependencies:
            if dep.target in node.inputs:
                dep.index_mapping[1] = _GroupMapping(k, reverse=True)
        for src in node.inputs:
            for dep in src.dependencies:
                if dep.target is node:
                    dep.index_mapping[1] = _GroupMapping(k)
    return tuple(sorted(ks))


class RootSafeImportance:
    """torch-pruning's importance, made safe for roots it does not score itself (depthwise,
    grouped and multiplier convs) or whose group it cannot score: it sizes its scores by the first layer it does score, which
    may be wider than the root (a concatenation after it) and then proposes channels the root
    does not have. Such a root is scored by the L1 norm of its own output filters instead, and a
    group that still cannot be scored is skipped (None)."""

    def __init__(self, base: Any):
        self.base = base

    def __call__(self, group: Any) -> torch.Tensor | None:
        root = group[0][0].target.module
        n = len(group[0][1])
        try:
            imp = self.base(group)
        except (IndexError, RuntimeError):
            imp = None
        if imp is not None and imp.numel() == n:
            return imp
        w = getattr(root, "weight", None)
        if isinstance(root, (nn.Conv2d, nn.Linear)) and w is not None and w.shape[0] == n:
            l1 = w.detach().flatten(1).abs().sum(1)
            return l1 / l1.mean().clamp_min(1e-12)
        return None


# -------------------------------------------------------------------------------------------
# checking and re-selecting a pruning group


def _whole_groups(idxs: list[int], k: int) -> bool:
    have = set(idxs)
    return all(all((i // k) * k + j in have for j in range(k)) for i in idxs)


def _same_counts(idxs: list[int], channels: int, groups: int) -> bool:
    per = channels // groups
    counts = [sum(1 for i in idxs if k * per <= i < (k + 1) * per) for k in range(groups)]
    return len(set(counts)) == 1 and counts[0] < per


def group_ok(dg: Any, group: Any, pre: dict[int, ShuffleState]) -> bool:
    """Whether pruning ``group`` keeps every layer valid: a multiplier conv loses whole groups, a
    grouped conv as many input (or output) channels from each group, no layer or shuffle loses
    all its channels."""
    from torch_pruning import _helpers

    for dep, idxs in group:
        plain = _helpers.to_plain_idxs(idxs)
        m, node = dep.target.module, dep.target
        if id(node) in pre and len(set(plain)) >= len(pre[id(node)].pre):
            return False
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out = dg.is_out_channel_pruning_fn(dep.handler)
            have = (m.out_channels if out else m.in_channels) if isinstance(m, nn.Conv2d) else \
                (m.out_features if out else m.in_features)
            if len(set(plain)) >= have:  # a layer left without channels
                return False
        if isinstance(m, MultiplierConv2d):
            if not _whole_groups(plain, m.out_channels // m.groups):
                return False
        elif is_grouped(m):
            channels = m.out_channels if dg.is_out_channel_pruning_fn(dep.handler) else m.in_channels
            if not _same_counts(plain, channels, m.groups):
                return False
    return True


def prune_group(group: Any, pre: dict[int, ShuffleState]) -> None:
    """Prune ``group`` and remove its channels from the shuffles it crosses."""
    from torch_pruning import _helpers

    crossed = [(pre[id(dep.target)], _helpers.to_plain_idxs(idxs)) for dep, idxs in group
               if id(dep.target) in pre and pre[id(dep.target)].nodes is not None
               and dep.target is pre[id(dep.target)].nodes[0]]
    group.prune()
    for st, idxs in crossed:
        st.remove(sorted(set(idxs)))


def balanced_indices(dg: Any, root: nn.Module, fn: Any, importance: torch.Tensor, n_pruned: int,
                     pre: dict[int, ShuffleState], search_budget: int = 5000, full: Any = None
                     ) -> list[int] | None:
    """Root channel indices to prune (about ``n_pruned``, least important first) that give every
    grouped conv in the root's group as many channels from each of its groups, and every
    multiplier conv whole groups; None when no such selection is found.

    Root channels are bundled into atoms (those that map into one group of a multiplier conv go
    together). Atoms of one kind (same size, same channel counts in the groups of each grouped
    conv they reach) are taken in rounds that remove as many channels from every group of every
    grouped conv they reach (least important atoms first, each group filled to its share, a
    depth-first search of at most ``search_budget`` steps per round); the least important round
    of any kind goes first. This finds selections that the block classes of
    :func:`aligned_indices` cannot express (one atom per group of two differently shuffled convs,
    on a diagonal). ``full``: the root's group over all its channels, when the caller has it."""
    import math

    n = int(importance.numel())
    full = full if full is not None else dg.get_pruning_group(root, fn, list(range(n)))
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    layers: list[tuple[int, int, list[int], list[int]]] = []  # (groups, per group, idxs, root idxs)
    for item in full:
        dep, idxs, roots = item.dep, list(item.idxs), list(item.root_idxs)
        m = dep.target.module
        if isinstance(m, MultiplierConv2d):
            k = m.out_channels // m.groups
            by_group: dict[int, list[int]] = {}
            for i, r in zip(idxs, roots):
                if r is not None:
                    by_group.setdefault(i // k, []).append(r)
            for members in by_group.values():
                for r in members[1:]:
                    parent[find(r)] = find(members[0])
        elif is_grouped(m):
            channels = m.out_channels if dg.is_out_channel_pruning_fn(dep.handler) else m.in_channels
            layers.append((m.groups, channels // m.groups, idxs, roots))
    atom_of = [find(r) for r in range(n)]
    atoms: dict[int, list[int]] = {}
    for r in range(n):
        atoms.setdefault(atom_of[r], []).append(r)
    # per atom and grouped conv: channels it removes from each group there
    hits: dict[int, list[dict[int, int]]] = {a: [{} for _ in layers] for a in atoms}
    for li, (_, per, idxs, roots) in enumerate(layers):
        for i, r in zip(idxs, roots):
            if r is not None:
                h = hits[atom_of[r]][li]
                h[i // per] = h.get(i // per, 0) + 1
    score = {a: float(importance[torch.tensor(members)].sum()) for a, members in atoms.items()}
    kinds: dict[tuple, list[tuple[float, int]]] = {}
    for a, members in atoms.items():
        kind = (len(members), tuple(tuple(sorted(h.values())) for h in hits[a]))
        kinds.setdefault(kind, []).append((score[a], a))
    for v in kinds.values():
        v.sort()

    def best_round(kind: tuple, taken: set[int]) -> list[int] | None:
        # a round of ``size`` atoms of one kind removes as many channels from every group of each
        # grouped conv it reaches: ``size * per_atom`` channels over ``groups`` groups
        totals = {li: sum(c) for li, c in enumerate(kind[1]) if sum(c) > 0}
        size = math.lcm(*(layers[li][0] // math.gcd(layers[li][0], t) for li, t in totals.items())) if totals else 1
        cap = {li: size * t // layers[li][0] for li, t in totals.items()}
        used = {li: [0] * layers[li][0] for li in totals}
        free = [a for _, a in kinds[kind] if a not in taken]
        picked: list[int] = []
        budget = [search_budget]

        def fits(a: int) -> bool:
            return all(used[li][b] + c <= cap[li] for li in totals for b, c in hits[a][li].items())

        def put(a: int, sign: int) -> None:
            for li in totals:
                for b, c in hits[a][li].items():
                    used[li][b] += sign * c

        def extend(start: int) -> bool:
            # depth-first, least important first; a greedy pass alone gets stuck where the
            # groups of two convs must be filled on a diagonal
            if len(picked) == size:
                return True
            for j in range(start, len(free)):
                budget[0] -= 1
                if budget[0] < 0:
                    return False
                if fits(free[j]):
                    picked.append(free[j])
                    put(free[j], 1)
                    if extend(j + 1):
                        return True
                    put(picked.pop(), -1)
            return False

        return picked if extend(0) else None

    chosen: list[int] = []
    taken: set[int] = set()
    while len(chosen) < n_pruned:
        rounds = [(sum(score[a] for a in r) / (len(r) * kind[0]), r)
                  for kind in kinds for r in [best_round(kind, taken)] if r is not None]
        if not rounds:
            break
        _, r = min(rounds, key=lambda t: t[0])
        room = n_pruned - len(chosen)
        if len(chosen) and sum(len(atoms[a]) for a in r) > 2 * room:  # a last round far past the target
            break
        taken.update(r)
        chosen.extend(x for a in r for x in atoms[a])
    if not chosen or len(chosen) >= n:
        return None
    idxs = sorted(chosen)
    return idxs if group_ok(dg, dg.get_pruning_group(root, fn, idxs), pre) else None


def prune_aligned(pruner: Any, model: nn.Module, seen: dict[Any, ShuffleState]) -> None:
    """Run torch-pruning's ``pruner`` (built inside :func:`group_aware_convs` and
    :func:`shuffle_hooks` on ``model``) group by group: a group that passes :func:`group_ok` is
    pruned as proposed, one that fails is selected again by :func:`balanced_indices` (then
    :func:`aligned_indices`) at the same size, or left whole; the shuffles that lost channels
    are replaced at the end (:func:`finish_shuffles`)."""
    dg = pruner.DG
    pre = map_shuffles(dg, seen)
    blocks = tuple(sorted({st.groups for st in seen.values()} | set(map_multipliers(dg))))
    for group in pruner.step(interactive=True):
        if group_ok(dg, group, pre):
            prune_group(group, pre)
            continue
        root, fn = group[0][0].target.module, group[0][0].handler
        n = dg.get_out_channels(root) if dg.is_out_channel_pruning_fn(fn) else dg.get_in_channels(root)
        full = dg.get_pruning_group(root, fn, list(range(n)))
        scores = pruner.importance(full)
        if scores is None or scores.numel() != n:
            continue
        idxs = (balanced_indices(dg, root, fn, scores, len(group[0][1]), pre, full=full)
                or aligned_indices(dg, root, fn, scores, len(group[0][1]), pre, blocks))
        if idxs:
            prune_group(dg.get_pruning_group(root, fn, idxs), pre)
    finish_shuffles(model, list(seen.values()))


_CHUNKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def aligned_indices(dg: Any, root: nn.Module, fn: Any, importance: torch.Tensor, n_pruned: int,
                    pre: dict[int, ShuffleState], blocks: tuple[int, ...], max_shapes: int = 12
                    ) -> list[int] | None:
    """Root channel indices to prune (about ``n_pruned``, by least summed ``importance`` of their
    class) whose group passes :func:`group_ok`, trying classes "block ``l`` of ``s`` channels in
    each of ``G`` chunks" from the smallest; None when no class shape passes."""
    n = int(importance.numel())
    shapes = sorted({(s * g, s, g) for s in (1, *blocks) for g in _CHUNKS if n % (s * g) == 0 and s * g < n})
    for size, s, g in shapes[:max_shapes]:
        chunk = n // g
        classes = chunk // s
        k = max(1, round(n_pruned / size))
        if k >= classes:
            continue
        members = [[c * chunk + l * s + t for c in range(g) for t in range(s)] for l in range(classes)]
        scores = torch.stack([importance[torch.tensor(mb)].sum() for mb in members])
        chosen = torch.argsort(scores)[:k].tolist()
        idxs = sorted(i for l in chosen for i in members[l])
        if group_ok(dg, dg.get_pruning_group(root, fn, idxs), pre):
            return idxs
    return None
