"""Group-aligned structured pruning through grouped convolutions and channel shuffles.

torch-pruning traces a channel shuffle (``view(n, g, c/g, h, w) -> transpose(1, 2) -> reshape``,
:class:`recommender.models.blocks.ChannelShuffle`) as reshapes around an element-wise op, so it
would map channel ``i`` before the shuffle to channel ``i`` after it, which is wrong; and a
grouped convolution's input channels can only be pruned at the same positions in every group.
:func:`recommender.compress.prune.structured_prune` therefore leaves every layer around a shuffle
alone by default, and the shuffle presets (ResNet 5, 13, 14; VGG 8, 12, 13) lose almost nothing.

With ``grouped="aligned"`` instead:

1. every :class:`ChannelShuffle` is located in torch-pruning's dependency graph (by the autograd
   node of its output, recorded by a forward hook while the graph is traced), and the edge across
   its transpose is given the shuffle's permutation (channel ``a * c/g + b`` before the shuffle
   is channel ``b * g + a`` after it) and its inverse;
2. each pruning group the pruner proposes is checked at every layer it touches: a shuffle must
   lose the same positions in each of its ``g`` groups (so it still is a ``g``-group shuffle), a
   grouped conv's input channels the same positions in each of its groups (the weight has one
   input slice per group), its output channels the same count per group;
3. a group that fails is re-selected: channels are bundled into classes "block ``l`` of size
   ``s`` in each of ``G`` equal chunks" of the root layer, for the smallest class size whose
   selection passes the check, and the least important classes (summed L1 importance) go.

Every group keeps its group count: grouped convs and shuffles are pruned alike in every group,
not by removing whole groups.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["ShuffleMapping", "shuffle_hooks", "map_shuffles", "group_ok", "aligned_indices"]


class ShuffleMapping:
    """torch-pruning index mapping across a channel shuffle of ``channels`` channels in ``groups``
    groups: before -> after (``reverse=False``) or after -> before."""

    def __init__(self, channels: int, groups: int, reverse: bool = False):
        self.per = channels // groups
        self.groups = groups
        self.reverse = reverse

    def __call__(self, idxs: list[Any]) -> list[Any]:
        from torch_pruning import _helpers

        out = []
        for i in idxs:
            j = (i.idx % self.groups) * self.per + i.idx // self.groups if self.reverse \
                else (i.idx % self.per) * self.groups + i.idx // self.per
            out.append(_helpers._HybridIndex(idx=j, root_idx=i.root_idx))
        return out


@contextlib.contextmanager
def shuffle_hooks(model: nn.Module) -> Iterator[dict[Any, tuple[int, int]]]:
    """While active, every :class:`ChannelShuffle` forward records ``output.grad_fn -> (channels,
    groups)`` in the yielded dict (trace the dependency graph inside it)."""
    from ..models.blocks import ChannelShuffle

    seen: dict[Any, tuple[int, int]] = {}

    def hook(mod: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if mod.groups > 1 and output.grad_fn is not None:
            seen[output.grad_fn] = (int(output.shape[1]), int(mod.groups))

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


def map_shuffles(dg: Any, seen: dict[Any, tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """Give the edges across every recorded shuffle's transpose its permutation; returns
    {id(node before the transpose): (channels, groups)} for :func:`group_ok`."""
    pre: dict[int, tuple[int, int]] = {}
    for node in list(dg.module2node.values()):
        info = seen.get(getattr(node, "grad_fn", None))
        if info is None:
            continue
        found = _transpose_of(node)
        if found is None or found[1] is None:
            continue
        t, after = found
        c, g = info
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
                dep.index_mapping[0] = ShuffleMapping(c, g)
        for dep in after.dependencies:
            if dep.target is t:
                dep.index_mapping[0] = ShuffleMapping(c, g, reverse=True)
        pre[id(t)] = (c, g)
        for n in t.inputs:
            pre[id(n)] = (c, g)
    return pre


def _reshape_type() -> Any:
    import torch_pruning as tp

    return tp.ops.OPTYPE.RESHAPE


def _same_positions(idxs: list[int], channels: int, groups: int) -> bool:
    per = channels // groups
    if per * groups != channels:
        return False
    sets = [sorted(i - k * per for i in idxs if k * per <= i < (k + 1) * per) for k in range(groups)]
    return all(s == sets[0] for s in sets)


def _same_counts(idxs: list[int], channels: int, groups: int) -> bool:
    per = channels // groups
    counts = [sum(1 for i in idxs if k * per <= i < (k + 1) * per) for k in range(groups)]
    return len(set(counts)) == 1 and counts[0] < per


def group_ok(dg: Any, group: Any, pre: dict[int, tuple[int, int]]) -> bool:
    """Whether pruning ``group`` keeps every grouped conv and every mapped shuffle consistent."""
    from torch_pruning import _helpers

    for dep, idxs in group:
        plain = _helpers.to_plain_idxs(idxs)
        m, node = dep.target.module, dep.target
        if id(node) in pre:
            c, g = pre[id(node)]
            if not _same_positions(plain, c, g):
                return False
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            if dg.is_out_channel_pruning_fn(dep.handler):
                if not _same_counts(plain, m.out_channels, m.groups):
                    return False
            elif not _same_positions(plain, m.in_channels, m.groups):
                return False
    return True


_CHUNKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def aligned_indices(dg: Any, root: nn.Module, fn: Any, importance: torch.Tensor, n_pruned: int,
                    pre: dict[int, tuple[int, int]], blocks: tuple[int, ...], max_shapes: int = 12
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
