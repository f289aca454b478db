"""End to end on digits at smoke fidelity: search, interrupt, resume, JSON answer vs the storage."""

from __future__ import annotations

import json
import textwrap

import optuna
import pytest
import torch

from recommender import recommend
from recommender.cli import main
from recommender.search.rungs import read_rungs

torch.set_num_threads(2)

SPACE = textwrap.dedent("""
    family: resnet
    arch:
      stem: {value: dws}
      stem_width: {value: 16}
      block: {value: ghost}
      widths: {choices: [[16, 24, 40, 88], [10, 22, 42, 86]]}
      inner: {value: [32, 64, 128, 256]}
      drop_last: {value: true}
      head: {value: nofc}
      width_multiplier: {choices: [0.5, 1.0]}
    prune:
      method: {choices: [none, unstructured-l1]}
      sparsity: {low: 0.2, high: 0.5, step: 0.3, when: {method: unstructured-l1}}
    quant:
      scheme: {choices: [fp32, int8-dynamic]}
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    space = root / "space.yaml"
    space.write_text(SPACE)
    common = dict(model="resnet18", max_drop="50%", budgets=["1M-params"], dataset="digits",
                  fidelity="smoke", space=str(space), confirm_fidelity="smoke", n_confirm=1,
                  latency=False, studies_dir=str(root / "studies"), warm_start=False, seed=0,
                  study_name="e2e")
    return root, common


class Interrupt(Exception):
    pass


def test_search_interrupt_resume_and_json(setup, capsys):
    root, common = setup
    # 1) A run interrupted (Ctrl-C) after its second finished trial keeps those trials.
    def stop_after_two(study, trial):
        if len([t for t in study.trials if t.state.is_finished()]) >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recommend(**common, trials=4, callbacks=[stop_after_two])
    storage = f"sqlite:///{root / 'studies' / 'e2e.db'}"
    study = optuna.load_study(study_name="e2e", storage=storage)
    kept = {t.number: t.values for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(kept) == 2
    assert study.user_attrs["baseline_evaluations"] == 1

    # 2) The same command resumes: only the missing trials run, nothing is lost or retrained.
    argv = ["--model", "resnet18", "--max-drop", "50%", "--budget", "1M-params", "--fidelity", "smoke",
            "--space", common["space"], "--confirm-fidelity", "smoke", "--n-confirm", "1", "--no-latency",
            "--studies-dir", common["studies_dir"], "--no-warm-start", "--study-name", "e2e",
            "--trials", "4", "--json", "--quiet"]
    assert main(argv) == 0
    answer = json.loads(capsys.readouterr().out)

    study = optuna.load_study(study_name="e2e", storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) >= 4
    for number, values in kept.items():  # completed trials survive the interruption untouched
        assert study.trials[number].values == values
    assert study.user_attrs["baseline_evaluations"] == 1
    assert len({t.number for t in study.trials}) == len(study.trials)

    # 3) The JSON answer is what the storage says.
    assert answer["study"]["name"] == "e2e"
    assert answer["study"]["n_trials"] == len(finished)
    _, evidence = read_rungs(study)
    rung1 = optuna.load_study(study_name="e2e.rung1", storage=storage).user_attrs["baseline"]
    assert [r["baseline"]["accuracy"] for r in answer["rungs"]] == pytest.approx(
        [study.user_attrs["baseline"]["accuracy"], rung1["accuracy"]])
    rec = answer["recommended"]
    assert rec is not None and set(rec) >= {"recipe", "accuracy", "drop", "params", "mflops", "size_mb",
                                            "latency_ms", "feasible"}
    trial = study.trials[rec["trial"]]
    assert rec["recipe"] == trial.user_attrs["recipe"]
    assert rec["params"] == trial.user_attrs["evaluation"]["costs"]["params"] <= 1e6
    # the recommendation is the cheapest candidate whose drop at the highest rung (here the
    # second-seed re-check, rung 1) is within 50 pp, beside that rung's baseline; every rung it
    # ran is listed, lowest first
    confirmed = {n: per[1] for n, (_, _, per) in evidence.items() if 1 in per and per[1]["ok"]}
    assert rec["trial"] in confirmed and rec["rung"] == 1 and answer["baseline"]["rung"] == 1
    assert answer["baseline"]["accuracy"] == pytest.approx(rung1["accuracy"])
    assert rec["confirmed"] and rec["drop"] == pytest.approx(confirmed[rec["trial"]]["drop_pp"])
    assert [r["rung"] for r in rec["rungs"]] == [0, 1]
    assert rec["rungs"][0]["drop"] == pytest.approx(trial.user_attrs["evaluation"]["drop_pp"])
    assert rec["drop"] <= 50
    cheaper = [n for n, e in confirmed.items() if e["costs"]["params"] < rec["params"]]
    assert all(confirmed[n]["drop_pp"] > 50 for n in cheaper)
    assert all(p["holds"] for p in answer["pareto"]) and rec["trial"] in [p["trial"] for p in answer["pareto"]]
    assert answer["power"]["min_resolvable_drop_pp"] > 0 and answer["power"]["rung"] == 1

    # 4) Files for follow-through, and `recommend show` renders from storage alone.
    recipe_file = root / "studies" / "e2e" / "recipe.json"
    assert json.loads(recipe_file.read_text())["recipe"] == rec["recipe"]
    assert main(["show", "e2e", "--studies-dir", common["studies_dir"]]) == 0
    shown = capsys.readouterr().out
    assert "Recommended: trial" in shown and f"trial {rec['trial']}" in shown

    # 5) Running the finished study again does no new work.
    assert main(argv) == 0
    capsys.readouterr()
    again = optuna.load_study(study_name="e2e", storage=storage)
    assert len([t for t in again.trials if t.state.is_finished()]) == len(finished)


def test_python_api_objects(setup):
    root, common = setup
    rec = recommend(**common, trials=4)  # the finished study: no new trials
    assert rec.recipe is not None and rec.evaluation.accuracy is not None
    df = rec.pareto
    assert {"trial", "accuracy_pct", "params"} <= set(df.columns)
    assert len(df) == len(rec.front) >= 1
    assert "Recommended: trial" in rec.explain()
    arch = rec.build_architecture()
    assert arch(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    # the model as recommended: compressed, its weights from the cache, measured again alike
    from recommender.measure import count_nonzero_params, count_params

    model, again = rec.load_model(return_evaluation=True)
    assert count_params(model) == rec.evaluation.costs["params"]
    assert count_nonzero_params(model) == rec.evaluation.costs["nonzero_params"]
    assert rec.evaluation.acc_low <= again.accuracy <= rec.evaluation.acc_high
    assert rec.study.study_name == "e2e"
