"""recommender.compress.prune_sensitivity and the structured-pruning knobs (allocation, round_to)."""

import copy

import torch

torch.set_num_threads(1)

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from recommender.compress.methods import make_config  # noqa: E402
from recommender.compress.prune import StructuredChannelConfig, apply_pruning  # noqa: E402
from recommender.compress.prune_sensitivity import (  # noqa: E402
    GroupSensitivity,
    PruneSensitivity,
    _groups,
    _zero_channels,
    allocate_ratios,
    kept_params,
    measure_sensitivity,
    recalibrate_bn,
)
from recommender.errors import RecommenderError  # noqa: E402
from recommender.measure import count_params  # noqa: E402
from recommender.models import build_model  # noqa: E402
from recommender.models.arch import ArchConfig  # noqa: E402

from helpers import nontrivial_bn  # noqa: E402

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def net(width: float = 0.25) -> nn.Module:
    torch.manual_seed(0)
    # non-trivial BN statistics and affine parameters, as in a trained network
    return nontrivial_bn(build_model("resnet18", ArchConfig(width_multiplier=width), num_classes=10).eval())


def batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def test_zeroing_a_group_computes_what_pruning_it_computes():
    m = net()
    dg, groups, _ = _groups(m, X)
    names = {mod: n for n, mod in m.named_modules()}
    x = torch.randn(4, 3, 8, 8)
    checked = 0
    for g in groups[:4]:  # residual streams and block-internal groups
        root, fn = g[0][0].target.module, g[0][0].handler
        n = len(g[0][1])
        idxs = list(range(0, n, 3))
        pruned = copy.deepcopy(m)
        proot = dict(pruned.named_modules())[names[root]]
        pdg, _, _ = _groups(pruned, X)
        pdg.get_pruning_group(proot, fn, idxs).prune()
        saved = _zero_channels(dg, dg.get_pruning_group(root, fn, idxs), names)
        with torch.no_grad():
            assert torch.allclose(m(x), pruned(x), atol=1e-4), names[root]
        for t, s in saved:
            t.copy_(s)
        assert count_params(pruned) < count_params(m)
        checked += 1
    assert checked == 4


def test_recalibrate_bn_estimates_the_batch_statistics():
    m = net()
    imgs = [x for x, _ in batches(3, 2)]
    before = m.bn1.running_mean.clone()
    recalibrate_bn(m, imgs)
    with torch.no_grad():
        act = torch.cat([m.conv1(x) for x in imgs])
    assert not m.training and m.bn1.momentum == 0.1
    assert torch.allclose(m.bn1.running_mean, act.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(before, m.bn1.running_mean)


def test_measure_sensitivity_covers_every_group_and_round_trips():
    m = net()
    s = measure_sensitivity(m, batches(2, 3), batches(2, 4), X, ratios=(0.5, 0.25))
    assert s.groups and all(g.ratios == (0.25, 0.5) and len(g.accuracy) == 2 for g in s.groups)
    assert 0.0 <= s.base_accuracy <= 1.0 and s.calib_images == 32 and s.score_images == 32
    assert PruneSensitivity.from_dict(s.to_dict()) == s
    # the model is not modified
    ref = net()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))


def synthetic() -> PruneSensitivity:
    # two groups of equal cost: "a" loses 40 pp at half its channels, "b" nothing
    groups = [GroupSensitivity("a", ("a",), 10, (0.25, 0.5, 0.75), (0.7, 0.5, 0.2)),
              GroupSensitivity("b", ("b",), 10, (0.25, 0.5, 0.75), (0.9, 0.9, 0.88))]
    return PruneSensitivity(0.9, groups, params={"a": 1000, "b": 1000}, couplings={"a": ["a", None],
                                                                                     "b": ["b", None]})


def test_allocation_prunes_the_insensitive_group_more_at_the_same_size():
    s = synthetic()
    for target in (0.2, 0.3, 0.5):
        r = allocate_ratios(s, target)
        assert r["b"] > target > r["a"]
        uniform = kept_params(s, {"a": target, "b": target})
        assert abs(kept_params(s, r) - uniform) <= 0.003 * uniform


def test_allocation_rejects_a_bad_target():
    with pytest.raises(RecommenderError):
        allocate_ratios(synthetic(), 1.2)


def test_sensitivity_allocation_keeps_the_uniform_parameter_count():
    m = net(0.5)
    bs = batches(4, 5)
    for target in (0.3, 0.5):
        u, _ = apply_pruning(m, StructuredChannelConfig(sparsity=target), example_input=X, measure_flops=False)
        s, rep = apply_pruning(m, StructuredChannelConfig(sparsity=target, allocation="sensitivity"),
                               example_input=X, batches=bs, measure_flops=False)
        assert rep.prunable
        assert abs(count_params(s) - count_params(u)) <= 0.03 * count_params(u)
        with torch.no_grad():
            assert s(X).shape == (1, 10)


def test_round_to_keeps_channel_multiples():
    m = net(0.5)
    p, rep = apply_pruning(m, StructuredChannelConfig(sparsity=0.3, round_to=8), example_input=X,
                           measure_flops=False)
    skip = set(rep.ignored_layers)
    widths = [mod.out_channels for n, mod in p.named_modules() if isinstance(mod, nn.Conv2d) and n not in skip]
    assert widths and all(w % 8 == 0 for w in widths)
    assert count_params(p) < count_params(m)


def test_new_fields_keep_the_old_serialisation():
    old = {"method": "structured-channel", "sparsity": 0.3, "importance": "l1", "finetune_steps": 0}
    assert StructuredChannelConfig(sparsity=0.3).to_dict() == old
    cfg = make_config("prune", {**old, "round_to": 16, "allocation": "sensitivity", "grouped": "aligned"})
    assert cfg.to_dict() == {**old, "allocation": "sensitivity", "round_to": 16, "grouped": "aligned"}
    assert make_config("prune", cfg.to_dict()) == cfg
    for bad in ({"round_to": 3}, {"round_to": True}, {"allocation": "random"}, {"grouped": "whole"}):
        with pytest.raises(RecommenderError):
            StructuredChannelConfig(sparsity=0.3, **bad)


def test_a_study_measures_the_sensitivity_once_and_keeps_it_in_its_cache(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import TinyCNN

    import recommender.evaluation as evaluation
    from recommender.cache import WeightsCache
    from recommender.compress.prune_sensitivity import SensitivityConfig, sensitivity_name
    from recommender.data import load_dataset
    from recommender.evaluation import Evaluator
    from recommender.models import register_module
    from recommender.protocol import get_protocol
    from recommender.recipe import Recipe

    data = load_dataset("digits")
    name = register_module(TinyCNN())
    proto = get_protocol("smoke", threads=1)
    cache = WeightsCache(tmp_path)
    ev = Evaluator(name, data, proto, cache=cache, latency=False)
    base = ev.evaluate_baseline()
    recipe = Recipe.from_dict({"prune": {"method": "structured-channel", "sparsity": 0.3,
                                         "allocation": "sensitivity"}})
    out = ev.evaluate(recipe, base)
    assert out.ok and out.inherited, out.reason
    assert cache.load_json(ev.baseline_key(), sensitivity_name(SensitivityConfig())) is not None
    # a second evaluator on the same cache (a resumed study) reads it instead of measuring
    monkeypatch.setattr(evaluation, "measure_sensitivity", lambda *a, **k: pytest.fail("measured again"))
    ev2 = Evaluator(name, data, proto, cache=cache, latency=False)
    assert ev2.prune_sensitivity() == ev.prune_sensitivity()
    assert ev2.evaluate(recipe, ev2.evaluate_baseline()).ok
