"""Structure-aware sampling: the resample and constraint policies, the GP sampler, the benchmark's
hypervolume. A tiny CNN on digits at smoke fidelity: the space is pruning only, and a params
budget that unpruned or lightly pruned structures break."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyCNN  # noqa: E402

from recommender.constraints import MaxDrop, parse_budgets  # noqa: E402
from recommender.data import load_dataset  # noqa: E402
from recommender.errors import UnknownNameError  # noqa: E402
from recommender.evaluation import Evaluator  # noqa: E402
from recommender.models import register_module  # noqa: E402
from recommender.protocol import get_protocol  # noqa: E402
from recommender.search.objective import SKIPPED_ATTR, Objective, TrialFailed  # noqa: E402
from recommender.search.sampling import SamplerSettings, make_sampler  # noqa: E402
from recommender.search.space import SearchSpace  # noqa: E402

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.ERROR)

SPACE = textwrap.dedent("""
    prune:
      method: {choices: [none, unstructured-l1, structured-channel]}
      sparsity: {low: 0.1, high: 0.8, step: 0.1, when: {method: [unstructured-l1, structured-channel]}}
    quant:
      scheme: {choices: [fp32]}
""")
# TinyCNN has 5,466 params: unpruned, unstructured and 10-20 % channel pruning break 3k.
BUDGET = "3k-params"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    name = register_module(TinyCNN())
    data = load_dataset("digits")
    ev = Evaluator(name, data, get_protocol("smoke", threads=1), latency=False)
    space = SearchSpace.parse(SPACE, "tiny")
    return ev, space, ev.evaluate_baseline(), parse_budgets([BUDGET]), MaxDrop.parse("50%")


def _objective(setup, policy):
    ev, space, base, budgets, drop = setup
    return Objective(ev, space, base, drop, budgets, structure_policy=policy, seed=0)


def _study(sampler=None):
    return optuna.create_study(directions=["maximize", "minimize"],
                               sampler=sampler or make_sampler("tpe", 0, SamplerSettings(tpe_startup_trials=2)))


def test_resample_trains_only_structures_within_budget(setup):
    limit = setup[3][0].limit
    study = _study()
    study.optimize(_objective(setup, "resample"), n_trials=5, catch=(TrialFailed,))
    trials = study.trials
    assert len(trials) == 5  # rejected drafts are not trials
    assert all(t.state == optuna.trial.TrialState.COMPLETE and "evaluation" in t.user_attrs for t in trials)
    for t in trials:
        assert t.user_attrs["constraints"][1] <= 0
        assert t.user_attrs["evaluation"]["costs"]["params"] <= limit
        assert t.params["prune.method"] == "structured-channel"
    # with 2 of 3 methods over budget, five trials without a rejected draft are unlikely (<0.5 %)
    assert sum(sum(t.user_attrs.get("rejected_draws", {}).values()) for t in trials) > 0


def test_resample_keeps_enqueued_params(setup):
    """An enqueued candidate (a warm-start preset) is what the user asked for: not redrawn, but
    skipped before training with the reason."""
    study = _study()
    study.enqueue_trial({"prune.method": "none", "quant.scheme": "fp32"})
    study.optimize(_objective(setup, "resample"), n_trials=1, catch=(TrialFailed,))
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.PRUNED
    assert t.user_attrs["pruned_reason"].startswith("structure breaks the budget")
    assert "evaluation" not in t.user_attrs


def test_constraint_policy_skips_without_counting(setup, tmp_path):
    from recommender.report import recommendation_from_study
    from recommender.search.recovery import counted_trials
    from recommender.search.study import Search, StudySpec

    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE)
    spec = StudySpec(model=TinyCNN(), max_drop="50%", budgets=[BUDGET], fidelity="smoke", trials=3,
                     n_confirm=0, confirm_fidelity="none", latency=False, warm_start=False,
                     space=str(space_file), studies_dir=str(tmp_path), structure_policy="constraint",
                     seed=1)
    study = Search(spec).run()
    trials = study.get_trials()
    skipped = [t for t in trials if SKIPPED_ATTR in t.user_attrs]
    trained = [t for t in trials if "evaluation" in t.user_attrs]
    assert len(counted_trials(study)) == 3 == len(trained)
    assert skipped, "2 of 3 methods break the budget: some draw should have been skipped"
    for t in skipped:  # COMPLETE, with its structural excess as the budget constraint, untrained
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.constraints["budget_params"] > 0 and t.user_attrs["constraints"][1] > 0
    for t in trained:
        assert t.user_attrs["constraints"][1] <= 0
    counts = recommendation_from_study(study).counts
    assert counts["evaluated"] == 3 and counts["pruned"] >= len(skipped)  # skipped before training


def test_search_resamples_from_its_first_trial(setup, tmp_path):
    """Through ``Search`` (the default policy): every trial of the study trained a candidate
    within the budget, the first one included (the wrapper is in place before it is created)."""
    from recommender.search.study import Search, StudySpec

    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE)
    spec = StudySpec(model=TinyCNN(), max_drop="50%", budgets=[BUDGET], fidelity="smoke", trials=3,
                     confirm_fidelity="none", latency=False, warm_start=False, space=str(space_file),
                     studies_dir=str(tmp_path), seed=1)
    assert spec.structure_policy == "resample"
    trials = Search(spec).run().get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all(t.user_attrs["constraints"][1] <= 0 for t in trials)


def test_gp_sampler_runs_with_constraints(setup):
    study = _study(make_sampler("gp", 0, SamplerSettings(gp_startup_trials=2)))
    assert isinstance(study.sampler, optuna.samplers.GPSampler)
    study.optimize(_objective(setup, "constraint"), n_trials=6, catch=(TrialFailed,))
    assert len(study.trials) == 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(len(t.constraints) == 2 for t in study.trials)  # the GP needs them on every trial


def test_space_distributions_match_the_trials(setup):
    space = setup[1]
    study = _study(optuna.samplers.RandomSampler(seed=0))
    dists = space.distributions()
    for _ in range(5):
        trial = study.ask()
        space.sample(trial)
        for k, d in trial.distributions.items():
            assert dists[k] == d
        study.tell(trial, [0.5, 1.0])


def test_names_are_checked_and_reexported():
    from recommender.search.study import SAMPLERS, StudySpec, make_sampler as old_import

    assert old_import is make_sampler and "gp" in SAMPLERS
    with pytest.raises(UnknownNameError):
        StudySpec(model="resnet18", max_drop="2%", budgets=["1M-params"], structure_policy="maybe")
    with pytest.raises(UnknownNameError):
        make_sampler("grid", 0)


def _bench():
    spec = importlib.util.spec_from_file_location("search_efficiency", ROOT / "benchmarks" / "search_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_hypervolume_on_a_known_front():
    hv = _bench().hypervolume
    # (accuracy, cost), reference cost 100: staircase 0.5 x 0.5 + (0.8 - 0.5) x 0.2 = 0.31
    front = [(0.5, 50.0), (0.8, 80.0)]
    assert hv(front, 100.0) == pytest.approx(0.31)
    # dominated points and points at or over the reference add nothing; order does not matter
    assert hv([(0.8, 80.0), (0.4, 60.0), (0.9, 100.0), (0.5, 50.0)], 100.0) == pytest.approx(0.31)
    assert hv([], 100.0) == 0.0
    assert hv([(1.0, 0.0)], 100.0) == pytest.approx(1.0)


def test_time_budget_stops_a_trial_in_flight_and_queues_it_again(setup):
    """--timeout bounds the run: a trial still training when the search's time is up is stopped,
    marked interrupted (it does not count) and queued again with the same parameters."""
    import time

    from recommender.search.recovery import counts_toward_target

    ev, space, base, budgets, drop = setup
    study = _study()
    study.enqueue_trial({"prune.method": "structured-channel", "prune.sparsity": 0.5, "quant.scheme": "fp32"},
                        user_attrs={"preset": "p"})
    stop = time.monotonic() - 1.0  # already over: the evaluation stops at its first step
    obj = Objective(ev, space, base, drop, budgets, seed=0, stop_at=lambda: stop)
    study.optimize(obj, n_trials=1, catch=(TrialFailed,))
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.FAIL and first.user_attrs["interrupted"] is True
    assert "time budget" in first.user_attrs["fail_reason"] and not counts_toward_target(first)
    retry = study.trials[1]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs["preset"] == "p"
    # with time left, the queued candidate is evaluated and counts
    obj.stop_at = lambda: time.monotonic() + 600
    study.optimize(obj, n_trials=1, catch=(TrialFailed,))
    done = study.trials[1]
    assert done.state == optuna.trial.TrialState.COMPLETE and done.params == first.params
    assert counts_toward_target(done)
