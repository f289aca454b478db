"""One answer: every output, the exit code and the API read one ledger of evidence.

The scenarios are fake evaluations stored as the search stores them (no training): promotion
that keeps the candidates that held, a higher rung that refutes some candidates but not the
answer, a drop exactly at the tolerance, a chance-level baseline, the knee, the power line, the
sampler's fallback drafts, a reaped rung trial, latency noise, the structural pre-check of int8
and a derived study name. A property test checks the recommendation rule on random ledgers.
"""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import TINY_SPACE, baseline, evaluation, synthetic_study

from recommender.constraints import Budget, MaxDrop
from recommender.errors import RecommenderError
from recommender.evaluation import Baseline
from recommender.feasibility import Feasibility
from recommender.ledger import Ledger, RungInfo
from recommender.pareto import dominates, knee
from recommender.question import Question
from recommender.recipe import Recipe
from recommender.report import Recommendation, recommendation_from_study

# -- 1. promotion keeps the candidates that held ---------------------------------------------------

SCENARIO_1 = dict(base=0.80, max_drop="1%", budgets=["1M-params"])


def _scenario_1(tmp_path, rung1=None):
    """A 79.5 %/500k and D 79.7 %/600k hold; B 78.6 %/300k and C 78.7 %/350k miss, but their
    intervals reach the 1 pp tolerance."""
    cands = {0: {0: evaluation(0.795, 500e3, 0.80, half=0.8)},   # A
             1: {0: evaluation(0.786, 300e3, 0.80, half=0.8)},   # B
             2: {0: evaluation(0.787, 350e3, 0.80, half=0.8)},   # C
             3: {0: evaluation(0.797, 600e3, 0.80, half=0.8)}}   # D
    for t, ev in (rung1 or {}).items():
        cands[t][1] = ev
    return synthetic_study(tmp_path, **SCENARIO_1, cands=cands,
                           rungs={1: baseline(0.80)} if rung1 else None)


def test_promotion_sends_the_candidates_that_held_first(tmp_path):
    from recommender.search.rungs import PromotionPolicy

    ledger = Ledger.from_study(_scenario_1(tmp_path))
    promoted = ledger.promotion(1, PromotionPolicy().count)
    assert [e.trial for e in promoted] == [0, 3], "A and D held; B and C only might"


def test_a_refuted_promotion_does_not_discard_the_candidates_that_held(tmp_path):
    """B and C were promoted (the old rule) and both missed at rung 1: A and D still held at the
    highest rung they were measured on, so the answer is A, the cheaper, marked as resting on
    rung-0 evidence."""
    study = _scenario_1(tmp_path, rung1={1: evaluation(0.77, 300e3, 0.80), 2: evaluation(0.775, 350e3, 0.80)})
    rec = recommendation_from_study(study)
    assert rec.feasible and rec.chosen.trial == 0 and rec.rung == 0
    assert rec.uncertain() and any("rests on rung 0 evidence" in u for u in rec.answer.uncertain)
    assert "exceeded the tolerance" not in rec.explain(width=200)
    assert {e.trial for e in rec.front} == {0, 3}


# -- 2. one failure on a higher rung does not sink the study ----------------------------------------

def test_a_miss_at_rung_2_does_not_sink_a_rung_1_answer(tmp_path):
    b = 0.90
    cands = {0: {0: evaluation(0.895, 400e3, b), 1: evaluation(0.893, 400e3, b)},               # held at rung 1
             1: {0: evaluation(0.899, 300e3, b), 1: evaluation(0.897, 300e3, b), 2: evaluation(0.85, 300e3, b)}}
    study = synthetic_study(tmp_path, base=b, max_drop="2%", budgets=["1M-params"], cands=cands,
                            rungs={1: baseline(b), 2: baseline(b)}, promoted={1: [0, 1], 2: [1]})
    rec = recommendation_from_study(study)
    assert rec.feasible and rec.chosen.trial == 0 and rec.rung == 1
    assert all(e.trial != 1 for e in rec.alternatives.values()), "the refuted candidate is no alternative"
    assert [e.trial for e in rec.front] == [0]
    d = rec.to_dict()
    assert d["recommended"]["rung"] == 1 and d["recommended"]["status"] == "held"
    assert next(c for c in d["candidates"] if c["trial"] == 1)["status"] == "refuted"


# -- 3. a drop exactly at the tolerance holds ---------------------------------------------------------

def test_a_drop_exactly_at_the_tolerance_holds():
    from recommender.stats import paired_drop

    base = np.ones(1000, dtype=bool)
    cand = base.copy()
    cand[:7] = False
    d = paired_drop(base, cand)
    assert d.drop_pp > 0.7  # 0.7000000000000001: float rounding
    fz = Feasibility(MaxDrop.parse("0.7%"), (Budget.parse("1M-params"),))
    ev = {"ok": True, "accuracy": 0.993, "drop_pp": d.drop_pp, "drop_low_pp": d.ci_low_pp,
          "drop_high_pp": d.ci_high_pp, "costs": {"params": 10}}
    assert fz.verdict(ev, 1.0).holds
    assert all(c <= 0 for c in fz.constraint_values(d.drop_pp, ev["costs"], 1.0))
    rel = Feasibility(MaxDrop.parse("10%rel"), (Budget.parse("1M-params"),))
    assert rel.allowed_pp(0.57) < 5.7  # 5.699999999999999
    assert rel.verdict({**ev, "drop_pp": 5.7, "drop_low_pp": 5.0, "drop_high_pp": 6.4}, 0.57).holds
    assert not rel.verdict({**ev, "drop_pp": 5.71, "drop_low_pp": 5.0, "drop_high_pp": 6.4}, 0.57).holds


def test_a_boundary_drop_at_a_higher_rung_is_feasible(tmp_path):
    drop = 0.7000000000000001
    ev1 = {**evaluation(0.793, 100e3, 0.80), "drop_pp": drop, "drop_low_pp": 0.2, "drop_high_pp": 1.2}
    study = synthetic_study(tmp_path, base=0.80, max_drop="0.7%", budgets=["1M-params"],
                            cands={0: {0: evaluation(0.797, 100e3, 0.80), 1: ev1}}, rungs={1: baseline(0.80)})
    rec = recommendation_from_study(study)
    assert rec.feasible and rec.rung == 1


# -- 4. the files agree with the terminal --------------------------------------------------------------

def _two_rung_study(tmp_path):
    """Rung 0 is at chance (25 %), rung 1 trains properly (92.67 %); trial 1 is the answer at
    rung 1, trial 0 held at rung 0 but missed at rung 1, trial 2 was never promoted and missed."""
    cands = {0: {0: evaluation(0.2617, 50e3, 0.25), 1: evaluation(0.7577, 50e3, 0.9267)},
             1: {0: evaluation(0.1875, 335e3, 0.25), 1: evaluation(0.9556, 335e3, 0.9267)},
             2: {0: evaluation(0.09, 20e3, 0.25)}}
    return synthetic_study(tmp_path, base=0.25, max_drop="2%", budgets=["1M-params"], cands=cands,
                           rungs={1: baseline(0.9267)}, baseline_attr=baseline(0.25, low=0.21, high=0.29))


def test_every_output_tells_the_answer_at_its_deciding_rung(tmp_path):
    from recommender.api import write_outputs
    from recommender.plot import plot_data

    rec = recommendation_from_study(_two_rung_study(tmp_path))
    assert rec.feasible and rec.chosen.trial == 1 and rec.rung == 1
    assert rec.baseline.accuracy == pytest.approx(0.9267)
    files = write_outputs(rec, tmp_path / "out")
    md = files["report"].read_text()
    assert "92.67%" in md and "95.56%" in md and "25.00%" not in md.split("## ")[0].split("Evidence")[0]
    d = json.loads(files["report_json"].read_text())
    assert [r["baseline"]["accuracy"] for r in d["rungs"]] == pytest.approx([0.25, 0.9267])
    assert d["recommended"]["accuracy"] == pytest.approx(0.9556) and d["baseline"]["rung"] == 1
    assert [p["trial"] for p in d["pareto"]] == [1], "the front holds the answer, not the refuted trial 0"
    assert all(a["trial"] != 0 for a in d["alternatives"].values())
    df = rec.pareto
    assert list(df["trial"]) == [1] and df["accuracy_pct"].iloc[0] == pytest.approx(95.56)
    panels = plot_data(rec)
    assert [p["rung"] for p in panels] == [0, 1]
    star = panels[1]["chosen"]
    assert star["trial"] == 1 and star["accuracy"] == pytest.approx(95.56)
    assert panels[1]["floor"] == pytest.approx(92.67 - 2) and star["accuracy"] > panels[1]["floor"]
    assert panels[0]["chosen"] is None
    assert 2 in panels[0]["below"] or panels[0]["ylim"][0] <= 9.0
    text = rec.explain(width=120)
    assert "95.56%" in text and "92.67%" in text and "FEASIBLE at rung 1" in text


# -- 5. a chance-level baseline never passes as a plain FEASIBLE ----------------------------------------

def test_a_chance_level_baseline_marks_the_answer_uncertain_in_the_first_line(tmp_path):
    ev = {**evaluation(0.1055, 100e3, 0.1055), "drop_low_pp": 0.0, "drop_high_pp": 0.0}
    study = synthetic_study(tmp_path, base=0.1055, max_drop="2%", budgets=["1M-params"], cands={0: {0: ev}},
                            baseline_attr=baseline(0.1055, n=1000, low=0.087, high=0.127), num_classes=10)
    rec = recommendation_from_study(study)
    assert rec.feasible and rec.uncertain()
    first = rec.explain(width=300).splitlines()[0]
    assert "chance" in first and "10.0% on 10 classes" in first
    assert rec.to_markdown().splitlines()[0].startswith("**the baseline")
    assert rec.to_dict()["uncertain"] is True


# -- 6. the knee is a point above the chord --------------------------------------------------------

def test_the_knee_is_the_best_trade_off_not_the_worst():
    front = [(0.80, 1.0), (0.805, 6.0), (0.89, 7.0), (0.90, 10.0)]
    assert knee(front) == 2
    assert knee([(0.8, 1.0), (0.81, 5.0), (0.9, 10.0)]) is None  # only a point below the chord


def test_the_report_names_the_real_knee(tmp_path):
    b = 0.95
    pts = [(0.80, 1e3), (0.805, 6e3), (0.89, 7e3), (0.90, 10e3)]
    cands = {i: {0: evaluation(a, c, b)} for i, (a, c) in enumerate(pts)}
    rec = recommendation_from_study(synthetic_study(tmp_path, base=b, max_drop="20%", budgets=["1M-params"],
                                                    cands=cands))
    assert rec.chosen.trial == 0 and rec.alternatives["knee"].trial == 2


# -- 7. the power line: the deciding rung, and which figure is wider --------------------------------------

def test_the_power_line_is_computed_at_the_deciding_rung_and_names_what_is_wider(tmp_path):
    b = 0.95
    cands = {0: {0: evaluation(0.948, 1e3, b, half=2.5), 1: evaluation(0.948, 1e3, b, half=2.5)}}
    study = synthetic_study(tmp_path, base=b, max_drop="2%", budgets=["1M-params"], cands=cands,
                            baseline_attr=baseline(b, n=2000), rungs={1: baseline(b, n=5000)})
    rec = recommendation_from_study(study)
    p = rec.answer.power
    assert p.rung == 1 and p.n_val == 5000 and p.measured_pp == pytest.approx(2.5)
    assert p.min_resolvable_drop_pp < 2 < p.measured_pp
    line = next(g for g in rec.answer.gate if g.startswith("Power"))
    assert "rung 1, 5000 validation images" in line and "the measured resolution is wider" in line


# -- 8. the sampler's random fallback draws its own candidates -------------------------------------------

def test_the_fallback_drafts_are_not_the_base_samplers_drafts():
    from optuna.distributions import IntDistribution

    from recommender.search.sampling import FeasibleSampler

    space = {f"x{i}": IntDistribution(0, 10_000) for i in range(3)}
    drafts: list[tuple] = []

    def propose(trial):
        return tuple(trial.suggest_int(k, 0, 10_000) for k in space)

    def reject(c):
        drafts.append(c)
        return "no"

    sampler = FeasibleSampler(optuna.samplers.RandomSampler(seed=3), space, propose, reject,
                              max_draws=40, base_draws=20, seed=3)
    study = optuna.create_study(sampler=sampler)
    study.ask().suggest_int("x0", 0, 10_000)  # Optuna draws the relative sample at the first suggestion
    assert len(drafts) == 40 and len(set(drafts)) == 40, "fallback drafts replayed the base sampler's"


# -- 9. suspected defects ---------------------------------------------------------------------------

def test_a_rung_trial_reaped_after_its_evaluation_is_completed_from_it(tmp_path):
    from recommender.search.recovery import WORKER_ATTR, reap_dead_trials
    from recommender.search.study import rung_values

    b = 0.9
    study = synthetic_study(tmp_path, base=b, max_drop="2%", budgets=["1M-params"],
                            cands={0: {0: evaluation(0.9, 1e3, b)}}, rungs={1: baseline(b)}, promoted={1: [0]})
    rst = optuna.load_study(study_name="s.rung1", storage=study._storage)
    t = rst.ask()
    dead = {"host": "nowhere", "pid": 2 ** 22 + 12345, "start": 0}
    for k, v in {"source_trial": 0, "recipe": {}, "evaluation": evaluation(0.899, 1e3, b),
                 WORKER_ATTR: dead}.items():
        t.set_user_attr(k, v)
    from recommender.search import recovery

    alive = recovery.worker_alive
    try:
        recovery.worker_alive = lambda info: False
        assert reap_dead_trials(rst, rung_values) == [t.number]
    finally:
        recovery.worker_alive = alive
    assert rst.trials[t.number].state == optuna.trial.TrialState.COMPLETE
    rec = recommendation_from_study(study)
    assert rec.feasible and rec.rung == 1


def test_a_latency_within_its_noise_of_the_budget_is_uncertain(tmp_path):
    b = 0.9
    ev = evaluation(0.9, 11.9, b, metric="latency", latency_iqr_ms=0.4)
    rec = recommendation_from_study(synthetic_study(tmp_path, base=b, max_drop="2%", budgets=["12ms"],
                                                    cands={0: {0: ev}}))
    assert rec.feasible and rec.uncertain()
    assert any("measurement noise" in u for u in rec.answer.uncertain)


def test_the_structure_check_of_int8_is_a_lower_bound_after_conv_bn_fusion():
    """int8 static fuses every BN into its conv: its params are fewer than the float model's, so
    a params budget between the two must not reject it before training."""
    import torch

    from recommender.compress import apply_quantization
    from recommender.measure import count_params
    from recommender.models import build_model
    from recommender.recipe import QuantConfig
    from recommender.search.structure import check_structure

    recipe = Recipe(quant=QuantConfig("int8-static"))
    net = build_model("resnet18", recipe.arch, num_classes=10).eval()
    q, _ = apply_quantization(net, recipe.quant, calibration=[torch.randn(8, 3, 32, 32)],
                              example_input=torch.randn(1, 3, 32, 32))
    fused = count_params(q)
    float_params = count_params(net)
    assert fused < float_params
    limit = (fused + float_params) / 2
    check = check_structure("resnet18", 10, recipe, [Budget("params", limit)], (1, 3, 32, 32))
    assert check.feasible, check.reason()


# -- 10. a study name derived from the flags is checked -----------------------------------------------

def test_a_derived_study_name_is_checked():
    from recommender.search.study import StudySpec

    with pytest.raises(RecommenderError, match="--study-name"):
        StudySpec(model="resnet18", max_drop="2%", budgets=["1" + "0" * 300 + "-params"])


# -- the rule, on random ledgers ------------------------------------------------------------------------

def _ledger(cands, base_accs, tol=1.0):
    q = Question.of("m", "d", MaxDrop(tol), (Budget("params", 1e9),), num_classes=None)
    rungs = [RungInfo(k, f"r{k}", Baseline(a, a - 0.01, a + 0.01, {}, "trained", "p")) for k, a in enumerate(base_accs)]
    rows = []
    for i, per in enumerate(cands):
        evals = {}
        for k, (acc, cost, ok) in enumerate(per):
            evals[k] = evaluation(acc, cost, base_accs[k], half=0.3, ok=ok)
        rows.append((i, Recipe(), None, evals))
    return Ledger.build(q, rungs, rows)


measurement = st.tuples(st.floats(0.5, 1.0), st.sampled_from([1e3, 2e3, 3e3, 5e3, 8e3]),
                        st.sampled_from([True, True, True, False]))  # (accuracy, cost, it ran)
candidate = st.integers(1, 3).flatmap(lambda n: st.lists(measurement, min_size=n, max_size=n))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cands=st.lists(candidate, min_size=1, max_size=8),
       base_accs=st.lists(st.floats(0.6, 1.0), min_size=3, max_size=3), tol=st.sampled_from([0.5, 1.0, 3.0]))
def test_the_answer_is_feasible_whenever_a_candidate_held_and_is_not_dominated(cands, base_accs, tol):
    from recommender.cli import exit_code

    led = _ledger(cands, base_accs, tol)
    ans = led.answer()
    held = [e for e in led.entries if e.held]
    assert ans.feasible == bool(held)
    rec = Recommendation("s", "", led, counts={"finished": len(cands)})
    assert exit_code(rec) == (0 if held else 1) and rec.to_dict()["feasible"] == ans.feasible
    if held:
        c = ans.chosen
        assert c.held and c in ans.front
        for e in held:
            if e.rung >= c.rung and e.trial != c.trial:
                assert not dominates(e.point(led.primary), c.point(led.primary)), (e.trial, c.trial)
                if e.rung == c.rung:  # the same baseline: accuracy orders as minus the drop
                    da, ca = e.deciding.accuracy, c.deciding.accuracy
                    assert not (da >= ca and e.cost(led.primary) <= c.cost(led.primary)
                                and (da > ca or e.cost(led.primary) < c.cost(led.primary)))
        assert rec.evaluation is c.deciding.evaluation and rec.baseline is led.baseline(c.rung)
    else:
        assert ans.chosen is None and rec.recipe is None


# -- one small study end to end: every output tells the same story -----------------------------------



def test_one_small_study_tells_one_story(tmp_path, capsys):
    from recommender.api import show
    from recommender.cli import main
    from recommender.plot import plot_data

    (tmp_path / "space.yaml").write_text(TINY_SPACE)
    argv = ["--model", "resnet18", "--max-drop", "50%", "--budget", "1M-params", "--fidelity", "smoke",
            "--trials", "4", "--rungs", "2", "--max-promoted", "2", "--space", str(tmp_path / "space.yaml"),
            "--no-warm-start", "--no-latency", "--studies-dir", str(tmp_path / "studies"), "--study-name", "story",
            "--quiet"]
    code = main(argv)
    terminal = capsys.readouterr().out
    folder = tmp_path / "studies" / "story"
    d = json.loads((folder / "report.json").read_text())
    md = (folder / "report.md").read_text()
    rec = show("story", studies_dir=str(tmp_path / "studies"))
    assert code == (0 if d["feasible"] else 1) and d["feasible"] == rec.feasible
    assert len(d["rungs"]) == 2 and all(r["baseline"] is not None for r in d["rungs"] if r["measured"])
    r = d["recommended"]
    assert r is not None, terminal
    k = r["rung"]
    base = d["rungs"][k]["baseline"]["accuracy"]
    assert d["baseline"]["accuracy"] == base and d["baseline"]["rung"] == k == rec.rung
    assert r["baseline_accuracy"] == base
    acc, drop = f"{100 * r['accuracy']:.2f}%", f"{r['drop']:+.2f}"
    for text in (terminal, md):
        assert acc in text and f"{100 * base:.2f}%" in text and drop in text, text
    assert f"at rung {k}" in terminal and f"at rung {k}" in md
    row = rec.pareto.set_index("trial").loc[r["trial"]]
    assert row["rung"] == k and row["accuracy_pct"] == pytest.approx(100 * r["accuracy"])
    assert row["baseline_pct"] == pytest.approx(100 * base) and row["drop_pp"] == pytest.approx(r["drop"])
    star = next(p["chosen"] for p in plot_data(rec) if p["chosen"] is not None)
    panel = next(p for p in plot_data(rec) if p["chosen"] is not None)
    assert star["trial"] == r["trial"] and panel["rung"] == k and star["accuracy"] == pytest.approx(100 * r["accuracy"])
    assert panel["baseline"] == pytest.approx(100 * base)
    assert rec.evaluation.accuracy == pytest.approx(r["accuracy"]) and rec.baseline.accuracy == pytest.approx(base)
    assert (folder / "pareto.png").stat().st_size > 0
    if d["feasible"]:
        assert json.loads((folder / "recipe.json").read_text())["recipe"] == r["recipe"]
