"""Registries: model families (CIFAR, torchvision, user modules) and compression methods."""

from __future__ import annotations

import json

import pytest
import torch

from recommender.compress.methods import get_method, list_methods, make_config
from recommender.errors import ArchError, RecommenderError, UnknownNameError
from recommender.models import (ArchConfig, build_model, get_family, list_families, list_models, register_module, resolve_model)
from recommender.recipe import PruneConfig, QuantConfig, Recipe
from recommender.search.space import SearchSpace
from recommender.search.structure import check_structure
from recommender.constraints import parse_budgets

from fixtures import SmallNet

torch.set_num_threads(1)


def test_families_are_registered_with_what_they_support():
    assert {"cifar-resnet", "cifar-vgg", "torchvision"} <= set(list_families())
    assert get_family("resnet101").name == "cifar-resnet"
    assert get_family("vgg19_bn").name == "cifar-vgg"
    tv = get_family("tv:mobilenet_v2")
    assert tv.style == "imagenet" and tv.min_input == 32
    assert "width_multiplier" in tv.techniques_for("tv:mobilenet_v2")
    assert not tv.techniques_for("tv:resnet50")
    assert get_family("resnet101").presets and not tv.presets


@pytest.mark.parametrize("model", ["tv:resnet18", "tv:mobilenet_v2", "tv:mobilenet_v3_small", "tv:efficientnet_b0",
                                   "tv:shufflenet_v2_x1_0", "tv:regnet_x_400mf"])
def test_torchvision_models_build_and_run_at_32px(model):
    net = build_model(model, num_classes=7).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_torchvision_width_multiplier_and_refusals():
    full = sum(p.numel() for p in build_model("tv:mobilenet_v2", num_classes=10).parameters())
    half = sum(p.numel() for p in build_model("tv:mobilenet_v2", ArchConfig(width_multiplier=0.5), 10).parameters())
    assert half < 0.6 * full
    with pytest.raises(ArchError, match="does not support width_multiplier"):
        build_model("tv:resnet18", ArchConfig(width_multiplier=0.5), 10)
    with pytest.raises(ArchError, match="does not support block"):
        build_model("tv:mobilenet_v2", ArchConfig(block="ghost"), 10)


def test_unknown_names_are_clear_errors():
    with pytest.raises(UnknownNameError, match="unknown model 'tv:resnet500'.*tv:resnet18"):
        get_family("tv:resnet500")
    with pytest.raises(UnknownNameError, match="unknown model 'mobilenet_v2'"):
        resolve_model("mobilenet_v2")
    with pytest.raises(RecommenderError, match="cannot import 'no_such_pkg'"):
        resolve_model("no_such_pkg:make")
    # the paper's CIFAR ResNet-50 and torchvision's are different models
    assert "resnet50" in list_models() and "tv:resnet50" in list_models()


def test_user_module_is_keyed_by_architecture_and_initial_state():
    torch.manual_seed(0)
    a = SmallNet()
    name = register_module(a)
    assert name.startswith("custom:SmallNet-")
    assert register_module(a) == name  # same module, same name
    torch.manual_seed(1)
    assert register_module(SmallNet()) != name  # other initial weights
    assert register_module(SmallNet(width=8)) != name  # other architecture
    net = build_model(name, num_classes=10)
    assert net is not a and torch.equal(net.head.weight, a.head.weight)
    with pytest.raises(ArchError):
        build_model(name, ArchConfig(width_multiplier=0.5), 10)
    sp = SearchSpace.for_model(name)
    assert sp.keys() and all(not k.startswith("arch.") for k in sp.keys())  # pruning x quantization only


def test_factory_is_imported_and_seeded():
    a = resolve_model("fixtures:make_net", num_classes=10, seed=0)
    b = resolve_model("fixtures:make_net", num_classes=10, seed=0)
    c = resolve_model("fixtures:make_net", num_classes=10, seed=1)
    assert a == b != c


def test_compression_methods_declare_what_they_lower():
    assert set(list_methods("prune")) >= {"none", "unstructured-l1", "structured-channel"}
    assert set(list_methods("quant")) >= {"fp32", "fp16", "int8-dynamic", "int8-static"}
    assert get_method("prune", "structured-channel").lowers >= {"params", "flops"}
    assert "params" not in get_method("prune", "unstructured-l1").lowers
    assert "flops" not in get_method("quant", "int8-static").lowers
    with pytest.raises(UnknownNameError):
        make_config("prune", {"method": "low-rank"})


def test_recipe_json_names_methods_and_reads_old_files():
    r = Recipe(prune=PruneConfig("structured-channel", 0.3, importance="taylor"), quant=QuantConfig("int8-static"))
    d = r.to_dict()
    assert d["prune"] == {"method": "structured-channel", "sparsity": 0.3, "importance": "taylor", "finetune_steps": 0}
    assert Recipe.from_dict(json.loads(json.dumps(d))) == r
    old = {"prune": {"method": "none", "sparsity": 0.0, "importance": "l1", "step": 0.2, "finetune_steps": 0},
           "quant": {"scheme": "fp32", "engine": "x86", "calibration_batches": 8, "observer": "histogram"}}
    assert Recipe.from_dict(old) == Recipe()
    with pytest.raises(RecommenderError, match="sparsity"):
        Recipe.from_dict({"prune": {"method": "none", "sparsity": 0.5}})
    with pytest.raises(RecommenderError, match="rounds"):
        PruneConfig("unstructured-l1", 0.9, step=1e-9)


def test_structure_check_uses_method_estimates():
    budgets = parse_budgets(["1M-params"])
    args = ("resnet18", 10)
    # the CIFAR resnet18 has 11.2M params: int8 and unstructured pruning cannot lower params ...
    for recipe in (Recipe(quant=QuantConfig("int8-static")), Recipe(prune=PruneConfig("unstructured-l1", 0.9))):
        assert not check_structure(*args, recipe, budgets, (1, 3, 32, 32)).feasible
    # ... structured pruning can: 70% of the channels leaves ~1M
    check = check_structure(*args, Recipe(prune=PruneConfig("structured-channel", 0.8)), budgets, (1, 3, 32, 32))
    assert check.feasible, check.reason()
    # a size budget: int8's best case is a quarter of the float size
    size = parse_budgets(["15MB"])
    assert not check_structure(*args, Recipe(), size, (1, 3, 32, 32)).feasible
    assert check_structure(*args, Recipe(quant=QuantConfig("int8-static")), size, (1, 3, 32, 32)).feasible
    nz = parse_budgets(["3M-nonzero-params"])
    assert check_structure(*args, Recipe(prune=PruneConfig("unstructured-l1", 0.8)), nz, (1, 3, 32, 32)).feasible
    assert not check_structure(*args, Recipe(prune=PruneConfig("unstructured-l1", 0.5)), nz, (1, 3, 32, 32)).feasible


def test_cli_takes_a_factory_and_says_its_space_is_pruning_x_quantization(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests_dir = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests_dir), str(tests_dir.parent)]))
    out = subprocess.run(
        [sys.executable, "-m", "recommender.cli", "--model", "fixtures:make_net", "--max-drop", "60%",
         "--budget", "20k-params", "--fidelity", "smoke", "--trials", "2", "--rungs", "1", "--no-latency",
         "--no-warm-start", "--quiet", "--jobs", "1", "--studies-dir", str(tmp_path / "studies"), "--json"],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    d = json.loads(out.stdout)
    assert d["spec"]["model"].startswith("custom:SmallNet-")
    assert "pruning x quantization only" in d["space_note"]
    assert d["study"]["evaluated"] == 2
