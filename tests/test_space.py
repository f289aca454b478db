"""Search spaces: loading, validation, conditionals, presets as points, reproducible sampling."""

from __future__ import annotations

import textwrap

import optuna
import pytest
import torch

from recommender.errors import SearchSpaceError
from recommender.models import build_model, get_preset
from recommender.recipe import Recipe
from recommender.search.space import SearchSpace, bundled_spaces

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

FAMILIES = {"resnet": "resnet50", "vgg": "vgg16_bn"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def space(request):
    return request.param, SearchSpace.for_model(FAMILIES[request.param])


def test_bundled_spaces_load():
    assert {"resnet.yaml", "vgg.yaml", "torchvision.yaml", "generic.yaml"} <= set(bundled_spaces())
    for name in bundled_spaces():
        sp = SearchSpace.load_bundled(name)
        assert sp.keys()
        assert bool(sp.warm_start) == (name in ("resnet.yaml", "vgg.yaml"))


def test_every_preset_is_a_point_of_its_space(space):
    from recommender.models import list_presets

    family, sp = space
    names = list_presets(FAMILIES[family])
    assert set(sp.warm_start) <= set(names) and len(names) in (15, 13)
    for name in names:
        recipe = Recipe(arch=get_preset(name).arch)
        params = sp.params_for(recipe)
        assert sp.recipe({**_fixed(sp, params), **{k: _dec(v) for k, v in params.items()}}) == recipe


def _dec(v):
    import json
    return json.loads(v) if isinstance(v, str) and v[:1] == "[" else v


def _fixed(sp, params):
    """Fixed dimensions whose conditions hold for these params."""
    assigned = {}
    for d in sp.dimensions:
        if d.active(assigned):
            assigned[d.key] = d.value if d.fixed else _dec(params.get(d.key))
    return {k: v for k, v in assigned.items() if k not in params}


def _sample(sp, seed, n):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, sp.sample(trial)))
        study.tell(trial, [0.5, 1.0])
    return out


def test_conditionals_are_respected(space):
    family, sp = space
    for trial, recipe in _sample(sp, seed=1, n=40):
        params = trial.params
        for dim in sp.dimensions:
            if dim.fixed:
                continue
            parents_ok = all(
                (p in params or p in {d.key for d in sp.dimensions if d.fixed}) for p, _ in dim.when)
            if dim.key in params:
                assert parents_ok, f"{dim.key} sampled without its parent"
        if recipe.prune.method == "none":
            assert "prune.sparsity" not in params and recipe.prune.sparsity == 0.0
        if recipe.quant.scheme != "int8-static":
            assert "quant.engine" not in params


def test_same_seed_same_samples(space):
    family, sp = space
    a = [r for _, r in _sample(sp, seed=7, n=15)]
    b = [r for _, r in _sample(sp, seed=7, n=15)]
    c = [r for _, r in _sample(sp, seed=8, n=15)]
    assert a == b
    assert a != c


def test_sampled_configurations_build_and_run(space):
    """Every sampled architecture either builds and runs, or is rejected with a clear ArchError."""
    from recommender.errors import ArchError

    family, sp = space
    model = FAMILIES[family]
    built = 0
    for _, recipe in _sample(sp, seed=3, n=12):
        arch = recipe.arch.replace(width_multiplier=0.25)  # keep the forward pass cheap
        try:
            net = build_model(model, arch, num_classes=10)
        except ArchError as exc:
            assert str(exc) and "\n" not in str(exc)
            continue
        net.eval()
        with torch.no_grad():
            assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        built += 1
    assert built >= 6


def test_structured_pruning_is_group_aware_where_the_architecture_has_shuffles(space):
    """The family spaces prune grouped convs + shuffles (arch groups 4: ResNet 5, 13, 14, VGG 8,
    12) with the group-aware rule, and every other candidate as before (its recipe unchanged)."""
    family, sp = space
    seen = set()
    for _, recipe in _sample(sp, seed=5, n=200):
        if recipe.prune.method != "structured-channel":
            continue
        grouped = recipe.arch.groups == 4
        assert recipe.prune.grouped == ("aligned" if grouped else "skip"), recipe
        assert ("grouped" in recipe.prune.to_dict()) == grouped
        seen.add(grouped)
    assert seen == {True, False}


def test_the_trained_space_prunes_group_aware():
    sp = SearchSpace.load_bundled("trained.yaml")
    drawn = [r for _, r in _sample(sp, seed=2, n=40) if r.prune.method == "structured-channel"]
    assert drawn and all(r.prune.grouped == "aligned" for r in drawn)


@pytest.mark.parametrize("body,needle", [
    ("arch: [1, 2]", "must be a mapping"),
    ("arch:\n  nonsense: {choices: [1]}", "not an option"),
    ("arch:\n  se: {choices: []}", "non-empty"),
    ("arch:\n  se: {low: 2, high: 1}", "low > high"),
    ("arch:\n  conv: {choices: [standard], when: {block: standard}}", "listed before"),
    ("arch:\n  se: {choices: [true], value: true}", "exactly one"),
    ("bogus: 1", "unknown top-level"),
    ("arch: {se: {choices: [true]}\n", "not valid YAML"),
])
def test_malformed_space_files(tmp_path, body, needle):
    p = tmp_path / "space.yaml"
    p.write_text(textwrap.dedent(body))
    with pytest.raises(SearchSpaceError) as exc:
        SearchSpace.load(p)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(SearchSpaceError, match="cannot read"):
        SearchSpace.load(tmp_path / "nope.yaml")


def test_recipe_outside_space_is_rejected():
    sp = SearchSpace.for_model("resnet50")
    from recommender.models.arch import ArchConfig

    with pytest.raises(SearchSpaceError):
        sp.params_for(Recipe(arch=ArchConfig(stem_width=7)))


def test_warm_start_skips_presets_that_break_the_budget_or_do_not_apply(tmp_path):
    """ResNet-18 shares the ResNet family's presets: those whose structure breaks the budget are
    skipped by structure, the grouped-pointwise one (bottleneck blocks only) as not applicable;
    neither aborts the study (it did: the ArchError ended `recommend --model resnet18` with exit 2)."""
    from optuna.trial import TrialState

    from recommender.constraints import MaxDrop
    from recommender.report import skipped_presets_line
    from recommender.search.study import Search, StudySpec

    spec = StudySpec(model="resnet18", max_drop=MaxDrop.parse("5%"), budgets=["5M-params"], dataset="digits",
                     fidelity="smoke", studies_dir=str(tmp_path), trials=1, latency=False)
    search = Search(spec)
    n = search.warm_start()
    skipped = search.study.user_attrs["warm_start_skipped"]
    assert skipped["paper-resnet101-5"].startswith("does not apply") and "BasicBlock" in skipped["paper-resnet101-5"]
    assert not skipped["paper-resnet101-1"].startswith("does not apply")  # 42M params: by structure
    waiting = [t for t in search.study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert n == len(waiting) > 0
    assert not {t.user_attrs["preset"] for t in waiting} & set(skipped)
    line = skipped_presets_line(skipped)
    assert "skipped by structure: paper-resnet101-1" in line and "not applicable to this model: paper-resnet101-5" in line
    assert search.warm_start() == 0  # once per study
