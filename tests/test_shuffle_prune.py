"""Structured pruning through grouped convs, channel-multiplier convs and channel shuffles
(``grouped="aligned"``): pruned models compute what the unpruned model computes with the same
channels zeroed, and the shuffle presets lose the channels they are asked to."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

from recommender.compress import apply_pruning, apply_quantization
from recommender.compress.prune import StructuredChannelConfig, _tolerant_reshape_mapping
from recommender.compress.prune_sensitivity import _zero_channels
from recommender.compress.shuffle_prune import (
    GroupedConvPruner,
    MultiplierConv2d,
    balanced_indices,
    finish_shuffles,
    group_aware_convs,
    group_ok,
    map_multipliers,
    map_shuffles,
    prune_group,
    shuffle_hooks,
)
from recommender.measure import count_params
from recommender.models import build_model, get_preset
from recommender.models.blocks import ChannelPermute, FireModule
from recommender.recipe import QuantConfig

from helpers import nontrivial_bn

# the quantized cat kernel warns on every forward when it requantizes its inputs (correct, slower)
pytestmark = pytest.mark.filterwarnings("ignore:All inputs of this cat operator")


@contextlib.contextmanager
def _graph(m: nn.Module, x: torch.Tensor):
    """torch-pruning's graph of ``m`` as ``grouped="aligned"`` builds it."""
    import torch_pruning as tp

    with warnings.catch_warnings(), _tolerant_reshape_mapping(), group_aware_convs(m) as custom:
        warnings.simplefilter("ignore")
        with shuffle_hooks(m) as seen:
            dg = tp.DependencyGraph().build_dependency(m, example_inputs=x, customized_pruners=custom)
        pre = map_shuffles(dg, seen)
        map_multipliers(dg)
        yield dg, pre, seen


def test_a_grouped_conv_loses_different_input_positions_in_each_group():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 1, groups=2, bias=False)
    x = torch.randn(2, 8, 3, 3)
    pruned = GroupedConvPruner().prune_in_channels(copy.deepcopy(conv), [0, 5])  # group 0: pos 0, group 1: pos 1
    assert pruned.in_channels == 6 and pruned.weight.shape == (4, 3, 1, 1)
    zeroed = x.clone()
    zeroed[:, [0, 5]] = 0
    keep = [i for i in range(8) if i not in (0, 5)]
    with torch.no_grad():
        assert torch.allclose(pruned(x[:, keep]), conv(zeroed), atol=1e-6)
    with pytest.raises(RuntimeError, match="as many input channels"):
        GroupedConvPruner().prune_in_channels(copy.deepcopy(conv), [0, 1])


def test_a_fire_module_loses_whole_multiplier_groups_and_computes_what_zeroing_computes():
    """Fire-C (VGG 8/12): grouped squeeze + shuffle(4), expand3 with 2 outputs per input,
    cat + shuffle(8), then a grouped consumer. Two groups go one after the other, both through
    the shuffle(8): the squeeze's (whole expand3 groups follow) and expand1's."""
    torch.manual_seed(0)
    m = nn.Sequential(FireModule(64, 64, 16, expand3="grouped", groups=4), nn.Conv2d(64, 8, 1, groups=4)).eval()
    nontrivial_bn(m)
    x = torch.randn(2, 64, 6, 6)
    names = {mod: n for n, mod in m.named_modules()}
    pruned = copy.deepcopy(m)
    imp = torch.rand(32, generator=torch.Generator().manual_seed(0))
    saved = []
    with _graph(pruned, x) as (pdg, ppre, pseen), _graph(m, x) as (dg, pre, _):
        mods, pmods = dict(m.named_modules()), dict(pruned.named_modules())
        for root_name, n, count in (("0.squeeze.0", 16, 4), ("0.expand1.0", 32, 8)):
            proot, root = pmods[root_name], mods[root_name]
            fn = pdg.get_pruner_of_module(proot).prune_out_channels
            idxs = balanced_indices(pdg, proot, fn, imp[:n], count, ppre)
            assert idxs is not None and len(idxs) >= count, root_name
            group = pdg.get_pruning_group(proot, fn, idxs)
            assert group_ok(pdg, group, ppre)
            prune_group(group, ppre)
            ofn = dg.get_pruner_of_module(root).prune_out_channels
            saved += _zero_channels(dg, dg.get_pruning_group(root, ofn, idxs), names)
        finish_shuffles(pruned, list(pseen.values()))
        e3 = pmods["0.expand3"]
        assert isinstance(e3, MultiplierConv2d) and e3.groups == e3.in_channels == 12 and e3.out_channels == 24
    assert type(pruned[0].expand3) is nn.Conv2d  # the marker class is gone again
    assert any(isinstance(mod, ChannelPermute) for mod in pruned.modules())
    with torch.no_grad():
        assert torch.allclose(m(x), pruned(x), atol=1e-5)
    assert count_params(pruned) < count_params(m)
    for t, s in saved:
        t.copy_(s)


def test_a_selection_that_would_split_a_multiplier_group_is_refused():
    m = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, padding=1, groups=8)).eval()
    x = torch.randn(1, 4, 5, 5)
    with _graph(m, x) as (dg, pre, _):
        e3 = m[2]
        fn = dg.get_pruner_of_module(e3).prune_out_channels
        assert not group_ok(dg, dg.get_pruning_group(e3, fn, [0]), pre)  # half of group 0
        assert group_ok(dg, dg.get_pruning_group(e3, fn, [0, 1]), pre)
        group = dg.get_pruning_group(e3, fn, [2, 3])
        assert any(dep.target.module is m[0] and list(idxs) == [1] for dep, idxs in group)


@pytest.mark.parametrize("name", ["paper-vgg19-8", "paper-resnet101-13"])
def test_aligned_pruning_prunes_the_fire_and_ghost_shuffle_presets(name):
    torch.manual_seed(0)
    m = build_model(get_preset(name).model, name, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    skip, r0 = apply_pruning(m, StructuredChannelConfig(sparsity=0.3), example_input=x, measure_flops=False)
    aligned, r1 = apply_pruning(m, StructuredChannelConfig(sparsity=0.3, grouped="aligned"), example_input=x,
                                measure_flops=False)
    assert r0.achieved_sparsity < 0.12 and r1.achieved_sparsity >= 0.25, (r0.achieved_sparsity, r1.achieved_sparsity)
    assert all(type(mod) is nn.Conv2d for mod in aligned.modules() if isinstance(mod, nn.Conv2d))
    q, rep = apply_quantization(aligned, QuantConfig("int8-static", "x86", 2), calibration=[torch.randn(4, 3, 32, 32)])
    assert rep.applied, rep.note
    with torch.no_grad():
        assert q(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("block", ["bottleneck", "ghost"])
def test_a_group_through_a_shuffle_computes_what_zeroing_computes(block):
    """The paper's grouped bottleneck (ResNet 5) and ghost module with a grouped primary
    (ResNet 13): one group through a shuffle, selected by block classes and by rounds."""
    from recommender.compress.shuffle_prune import aligned_indices
    from recommender.models.blocks import Bottleneck, GhostModule

    torch.manual_seed(0)
    m = (Bottleneck(64, 64, 64, conv="depthwise", groups=4) if block == "bottleneck"
         else nn.Sequential(GhostModule(64, 64, groups=4), nn.Conv2d(64, 8, 1, groups=4))).eval()
    nontrivial_bn(m)
    x = torch.randn(2, 64, 6, 6)
    root_name = "conv1" if block == "bottleneck" else "0.primary"
    names = {mod: n for n, mod in m.named_modules()}
    imp = torch.rand(64, generator=torch.Generator().manual_seed(0))
    for select in ("classes", "rounds"):
        pruned = copy.deepcopy(m)
        with _graph(pruned, x) as (pdg, ppre, pseen), _graph(m, x) as (dg, pre, _):
            proot, root = dict(pruned.named_modules())[root_name], dict(m.named_modules())[root_name]
            fn = pdg.get_pruner_of_module(proot).prune_out_channels
            n = proot.out_channels
            idxs = (aligned_indices(pdg, proot, fn, imp[:n], n // 4, ppre, (4,)) if select == "classes"
                    else balanced_indices(pdg, proot, fn, imp[:n], n // 4, ppre))
            assert idxs is not None and len(idxs) >= 4, select
            group = pdg.get_pruning_group(proot, fn, idxs)
            assert group_ok(pdg, group, ppre)
            prune_group(group, ppre)
            finish_shuffles(pruned, list(pseen.values()))
            saved = _zero_channels(dg, dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels,
                                                            idxs), names)
        with torch.no_grad():
            assert torch.allclose(m(x), pruned(x), atol=1e-4), select
        assert count_params(pruned) < count_params(m)
        for t, s in saved:
            t.copy_(s)


def test_aligned_pruning_prunes_the_grouped_bottleneck_preset():
    torch.manual_seed(0)
    m = build_model("resnet50", get_preset("paper-resnet101-5").arch, num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    skip, r0 = apply_pruning(m, StructuredChannelConfig(sparsity=0.3), example_input=x, measure_flops=False)
    aligned, r1 = apply_pruning(m, StructuredChannelConfig(sparsity=0.3, grouped="aligned"), example_input=x,
                                measure_flops=False)
    assert r0.achieved_sparsity < 0.05 and r1.achieved_sparsity >= 0.25
    with torch.no_grad():
        assert aligned(torch.randn(2, 3, 16, 16)).shape == (2, 10)
