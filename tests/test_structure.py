"""The structure check before training: costs counted on the meta device equal fvcore's and the
real build's, the quick bound of structured pruning stays below torch-pruning, a budget below
the smallest the space reaches is refused up front, and a search whose drafts never fit stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recommender import measure
from recommender.compress.methods import CompressContext
from recommender.models import build_model, get_preset, list_presets
from recommender.models.arch import ArchConfig
from tests.test_bad_inputs import one_line_error, run

REPO = Path(__file__).resolve().parents[1]
SIZE = (1, 3, 32, 32)


def _archs(model: str) -> list[ArchConfig]:
    return [ArchConfig()] + [get_preset(p).arch for p in list_presets(model)]


@pytest.mark.parametrize("model", ["resnet18", "vgg11_bn", "tv:mobilenet_v2", "tv:shufflenet_v2_x1_0"])
def test_shape_costs_equal_fvcore_and_the_real_build(model):
    from recommender.shape_costs import build_meta, shape_costs

    archs = _archs(model) if not model.startswith("tv:") else [ArchConfig()]
    for arch in archs:
        try:
            real = build_model(model, arch, num_classes=10)
        except Exception:  # a preset this member cannot build
            continue
        meta = build_meta(lambda: build_model(model, arch, num_classes=10))
        assert meta is not None and next(meta.parameters()).is_meta
        c = shape_costs(meta, SIZE)
        assert c.params == measure.count_params(real), arch.describe()
        assert c.mflops == measure.count_flops(real, SIZE) / 1e6, arch.describe()
        assert c.size_mb <= measure.size_mb(real) <= c.size_mb_max, arch.describe()


def test_a_builder_that_needs_data_is_built_for_real():
    from recommender.search.structure import structure

    net, costs, _ = structure("tv:regnet_x_400mf", 10, ArchConfig(), SIZE)
    real = build_model("tv:regnet_x_400mf", ArchConfig(), num_classes=10)
    assert costs.params == measure.count_params(real) and costs.mflops == measure.count_flops(real, SIZE) / 1e6


def _check_bound(model: str, presets: list[str | None], sparsities=(0.5, 0.8)) -> None:
    from recommender.compress.prune import StructuredChannelConfig, _bound_structured, _estimate_structured
    from recommender.search.structure import structure

    for p in presets:
        arch = get_preset(p).arch if p else ArchConfig()
        net, costs, _ = structure(model, 10, arch, SIZE)
        real = build_model(model, arch, num_classes=10).eval()
        costs.size_mb = measure.size_mb(real)
        ctx = CompressContext(example_input=torch.zeros(SIZE))
        for s in sparsities:
            cfg = StructuredChannelConfig(sparsity=s)
            _, low = _bound_structured(net, cfg, costs, ctx)
            _, exact = _estimate_structured(real, cfg, costs, ctx)
            assert low.params <= exact.params and low.mflops <= exact.mflops and low.size_mb <= exact.size_mb, \
                (model, p, s, low, exact)


def test_structured_bound_is_below_torch_pruning():
    _check_bound("resnet18", [None, "paper-resnet101-10", "paper-resnet101-7"])
    _check_bound("vgg11", ["paper-vgg19-9"], (0.8,))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "vgg11"])
def test_structured_bound_is_below_torch_pruning_on_every_preset(model):
    # ghost blocks with grouped convs (presets 13, 14) are pruned in minutes by torch-pruning
    _check_bound(model, [p for p in list_presets(model) if not (get_preset(p).arch.block == "ghost"
                                                               and get_preset(p).arch.groups > 1)])


# -- the floor and the stop ---------------------------------------------------------------------------

def test_budget_below_the_floor_is_refused_up_front(capsys, tmp_path):
    code, _, err = run(capsys, "--model", "resnet18", "--budget", "100-params", "--fidelity", "smoke", "--trials",
                       "3", "--studies-dir", str(tmp_path))
    line = one_line_error(code, err, "is below the smallest params this search space reaches", exit_code=1)
    assert "params (best case of" in line
    assert not list(tmp_path.rglob("*.db")), "refused before a study is created"


def test_search_without_a_fitting_draft_stops(capsys, tmp_path, monkeypatch):
    """A budget the quick bound says is reachable but no draft meets: three trials in a row
    without a fitting draft end the run (exit 1), counted towards --trials, with the floor and
    the closest draft in the answer."""
    from recommender.models import resolve_model
    from recommender.recipe import PruneConfig, Recipe
    from recommender.search.structure import best_case, quick_best_case, structure

    monkeypatch.chdir(REPO)
    model = resolve_model("tests.helpers:TinyCNN", num_classes=10)
    net, costs, _ = structure(model, 10, ArchConfig(), SIZE)
    recipe = Recipe(prune=PruneConfig("structured-channel", 0.8))
    low = quick_best_case(net, costs, recipe, SIZE)[0].params
    exact = best_case(model, 10, recipe, SIZE, flops=False)[0].params
    assert low < exact
    budget = int((low + exact) / 2)
    space = tmp_path / "space.yaml"
    space.write_text("arch: {}\nprune:\n  method: {choices: [none, structured-channel]}\n"
                     "  sparsity: {value: 0.8, when: {method: structured-channel}}\nquant:\n  scheme: {choices: [fp32]}\n")
    code, out, err = run(capsys, "--model", "tests.helpers:TinyCNN", "--budget", f"{budget}-params", "--fidelity",
                         "smoke", "--trials", "20", "--space", str(space), "--no-latency", "--rungs", "1", "--quiet",
                         "--studies-dir", str(tmp_path / "s"), "--json")
    assert code == 1, err
    d = json.loads(out)
    assert d["budget_unreachable"]["line"].startswith("No candidate fits the budgets"), d["budget_unreachable"]
    assert len(d["budget_unreachable"]["trials"]) == 3 and d["study"]["finished"] == 3, d["study"]
    assert d["budget_unreachable"]["closest"], d["budget_unreachable"]
