"""Multi-fidelity promotion rungs, honest power, and parallel workers on one machine (SQLite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from tests.helpers import TINY_SPACE, interruptible_child

from recommender import recommend
from recommender.search import workers
from recommender.pareto import ranks
from recommender.search.rungs import PromotionPolicy, ladder, read_rungs
from recommender.search.study import counted_trials

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]

SPACE = TINY_SPACE



def common(tmp_path: Path, name: str, **kw):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return dict(model="resnet18", max_drop="60%", budgets=["1M-params"], dataset="digits", fidelity="smoke",
                space=str(space), latency=False, studies_dir=str(tmp_path / "studies"), warm_start=False,
                seed=0, study_name=name, write_files=False, **kw)


def test_ladder_and_selection():
    from recommender.protocol import get_protocol

    rungs = ladder(get_protocol("proxy"), 32, "auto")
    assert len(rungs) == 2
    r0, r1 = rungs[0].protocol, rungs[1].protocol
    assert r1.epochs == 3 * r0.epochs and r1.input_resolution(32) == 32 and r1.augment and r1.val_size == 0
    assert len(ladder(get_protocol("proxy"), 8, "3")) == 3
    assert [r.protocol.fidelity for r in ladder(get_protocol("smoke"), 8, "smoke,proxy")] == ["smoke", "proxy"]
    # the older confirm stage: a second seed at the search fidelity
    two = ladder(get_protocol("proxy"), 8, "auto", confirm_fidelity="proxy")
    assert two[1].protocol == get_protocol("proxy", seed=1)
    assert ranks([(0.9, 10), (0.7, 20), (0.85, 5)]) == [0, 1, 0]
    assert PromotionPolicy().count(9) == 3 and PromotionPolicy().count(2) == 2 and PromotionPolicy().count(0) == 0


def test_a_checkpoint_pins_every_rung_to_the_native_size(tmp_path):
    """A trained checkpoint is evaluated, and its weights inherited, at the size it was trained
    at: with ``--checkpoint`` every rung runs at the data's native size, not the fidelity's."""
    from recommender.compress.checkpoint import save_state
    from recommender.protocol import get_protocol
    from recommender.search.study import Search, StudySpec
    from tests.helpers import TinyCNN, make_folder

    make_folder(tmp_path / "imgs", classes=2, per_class=8, size=(32, 32))
    torch.manual_seed(0)
    save_state(tmp_path / "ckpt.pt", TinyCNN(2))
    spec = dict(model="tests.helpers:TinyCNN", dataset=f"imagefolder:{tmp_path / 'imgs'}", max_drop="5%",
                budgets=["20M-params"], fidelity="smoke", studies_dir=str(tmp_path / "studies"), latency=False,
                rungs="2")  # smoke's auto ladder has one rung: ask for a promotion rung to see it pinned
    lines: list[str] = []
    pinned = Search(StudySpec(**spec, checkpoint=str(tmp_path / "ckpt.pt")), log=lines.append)
    assert len(pinned.rungs) == 2
    assert [r.protocol.input_resolution(32) for r in pinned.rungs] == [32, 32]
    assert all("(32 px" in r.label for r in pinned.rungs)
    assert any("--checkpoint: every rung runs at the data's 32 px" in ln for ln in lines)
    free = Search(StudySpec(**spec, study_name="no-ckpt"), log=lines.append)
    assert free.rungs[0].protocol.input_resolution(32) == 8  # smoke's own size
    assert ladder(get_protocol("proxy"), 32, "auto", pin_resolution=24)[1].protocol.input_resolution(32) == 24


def test_power_line_when_validation_set_is_too_small(tmp_path, caplog):
    """...and a library call is quiet: no Optuna INFO line (study created, trial finished) and no
    experimental-feature warning reaches the caller, whose settings are restored after it."""
    import logging
    import warnings

    before = optuna.logging.get_verbosity()
    with caplog.at_level(logging.INFO, logger="optuna"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rec = recommend(**{**common(tmp_path, "power"), "max_drop": "0.5%"}, trials=2, rungs="1")
    assert not [r for r in caplog.records if r.name.startswith("optuna")], [r.getMessage() for r in caplog.records]
    assert not [w for w in seen if issubclass(w.category, optuna.exceptions.ExperimentalWarning)], \
        [str(w.message) for w in seen]
    assert optuna.logging.get_verbosity() == before
    p = rec.to_dict()["power"]
    assert p["n_val"] == 256 and p["min_resolvable_drop_pp"] > 0.5
    assert "Power: at rung 0, 256 validation images" in rec.explain(width=200)


class Interrupt(Exception):
    pass


def test_promotions_run_once_and_resume_where_they_stopped(tmp_path, monkeypatch):
    kw = common(tmp_path, "promo", trials=6, rungs="2", max_promoted=3)
    from recommender.evaluation import Evaluator

    real = Evaluator.evaluate
    calls = {"n": 0}

    def flaky(self, recipe, baseline, max_drop=None, **k):
        if "+r1" in self.protocol.fidelity:
            calls["n"] += 1
            if calls["n"] == 2:  # Ctrl-C while the second promoted candidate trains
                raise KeyboardInterrupt
        return real(self, recipe, baseline, max_drop, **k)

    monkeypatch.setattr(Evaluator, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        recommend(**kw)
    monkeypatch.setattr(Evaluator, "evaluate", real)
    storage = f"sqlite:///{tmp_path / 'studies' / 'promo.db'}"
    study = optuna.load_study(study_name="promo", storage=storage)
    promoted = study.user_attrs["promoted_1"]
    assert 2 <= len(promoted) <= 3
    before = {n: per for n, (_, _, per) in read_rungs(study)[1].items() if 1 in per}
    assert len(before) == 1  # one finished, one interrupted, the rest waiting

    rec = recommend(**kw)  # the same command resumes: the rest of rung 1, nothing twice
    study = optuna.load_study(study_name="promo", storage=storage)
    assert study.user_attrs["promoted_1"] == promoted  # decided once
    after = {n: per for n, (_, _, per) in read_rungs(study)[1].items() if 1 in per}
    assert sorted(after) == sorted(promoted)
    rung1_trials = optuna.load_study(study_name="promo.rung1", storage=storage).trials
    done = [t.user_attrs["source_trial"] for t in rung1_trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(done) == sorted(promoted), "each promoted candidate evaluated once"
    rung1 = optuna.load_study(study_name="promo.rung1", storage=storage)
    assert rung1.user_attrs["baseline_evaluations"] == 1
    assert len(counted_trials(study)) == 6 and study.user_attrs["baseline_evaluations"] == 1
    d = rec.to_dict()
    assert d["rungs"][1]["index"] == 1 and d["rungs"][1]["promoted"] == promoted
    if d["recommended"] is not None and d["feasible"]:
        assert d["recommended"]["rung"] == 1
        assert [r["rung"] for r in d["recommended"]["rungs"]] == [0, 1]


RUNNER = """
import sys, json
from recommender import recommend
if __name__ == "__main__":  # the workers are spawned: they re-import this file
    kw = json.loads(sys.argv[1])
    rec = recommend(**kw)
    print("DONE", rec.feasible)
"""


def test_two_workers_on_sqlite_reach_the_target_once(tmp_path):
    kw = common(tmp_path, "jobs", trials=5, rungs="1", jobs=2)
    rec = recommend(**kw)
    storage = f"sqlite:///{tmp_path / 'studies' / 'jobs.db'}"
    study = optuna.load_study(study_name="jobs", storage=storage)
    assert len(counted_trials(study)) == 5
    assert study.user_attrs["baseline_evaluations"] == 1
    assert rec.counts["evaluated"] >= 4


def test_workers_that_cannot_start_are_an_error_not_a_short_study(tmp_path):
    kw = common(tmp_path, "noguard", trials=3, rungs="1", jobs=2)
    script = tmp_path / "run.py"
    script.write_text("import sys, json\nfrom recommender import recommend\n"
                      "recommend(**json.loads(sys.argv[1]))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(script), json.dumps(kw)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    assert "__main__" in p.stderr


#: RUNNER with the CLI's signal handling (SIGTERM raises Terminated), as `recommend --jobs 2` runs
RUNNER_AS_CLI = RUNNER.replace(
    'if __name__ == "__main__":  # the workers are spawned: they re-import this file\n',
    'if __name__ == "__main__":  # the workers are spawned: they re-import this file\n'
    '    from recommender import interrupts\n    from recommender.errors import Terminated\n'
    '    interrupts.take_over(Terminated)\n')


#: ... whose coordinator kills its workers at once instead of giving them a grace period
RUNNER_NO_GRACE = RUNNER_AS_CLI.replace(
    "    interrupts.take_over(Terminated)\n",
    "    interrupts.take_over(Terminated)\n    from recommender.search import workers\n"
    "    workers.INTERRUPT_GRACE = 0.0\n")
RUNNERS = {"Ctrl-C to the process group": RUNNER, "SIGTERM to the coordinator alone": RUNNER_AS_CLI,
           "SIGTERM, workers killed without a grace period": RUNNER_NO_GRACE}


@pytest.mark.parametrize("how", list(RUNNERS))
def test_sigint_with_two_workers_leaves_a_resumable_study(tmp_path, how):
    """Ctrl-C in a terminal reaches every process of the group; a supervisor's SIGTERM (or a
    `kill`) reaches the coordinator alone, which passes it on to its workers. Either way every
    running trial is recorded as interrupted and queued again: none is left RUNNING. A worker
    killed past its grace period leaves its trial RUNNING: the coordinator fails and queues it."""
    # a target the run cannot reach before the signal, however fast the machine
    kw = common(tmp_path, "sigint", trials=500, rungs="1", jobs=2)
    script = tmp_path / "run.py"
    script.write_text(RUNNERS[how])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = open(tmp_path / "run.log", "wb")  # a file, not a pipe: nobody reads until the end
    p = subprocess.Popen([sys.executable, str(script), json.dumps(kw)], cwd=tmp_path, env=env,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         preexec_fn=interruptible_child)
    storage = f"sqlite:///{tmp_path / 'studies' / 'sigint.db'}"
    deadline = time.monotonic() + 500
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="sigint", storage=storage)
        except Exception:
            continue
        if len(counted_trials(study)) >= 2:
            break
    t0 = time.monotonic()
    if how.startswith("Ctrl-C"):
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    else:
        os.kill(p.pid, signal.SIGTERM)
    p.wait(timeout=120)
    stopped_s = time.monotonic() - t0
    log.close()
    out = (tmp_path / "run.log").read_text(errors="replace")
    assert p.returncode != 0, out[-3000:]
    study = optuna.load_study(study_name="sigint", storage=storage)
    kept = len(counted_trials(study))
    assert 2 <= kept < 500
    trials = study.get_trials(deepcopy=False)
    shown = "\n".join(f"{t.number} {t.state.name} {t.params} {t.user_attrs}" for t in trials[-6:])
    why = f"{stopped_s:.1f} s to stop\n{shown}\n{out[-3000:]}"
    assert not [t for t in trials if t.state.name == "RUNNING"], why
    # every trial stopped mid-evaluation is failed as interrupted and queued again, once
    stopped = [t for t in trials if t.state.name == "FAIL" and t.user_attrs.get("interrupted")]
    retries = [t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs]
    assert all(retries.count(t.number) == 1 or not t.params for t in stopped), why
    if "grace" not in how:
        assert stopped_s < workers.INTERRUPT_GRACE, why  # the workers stopped, not killed after the grace
    recommend(**{**kw, "trials": kept + 3})  # the study resumes and reaches its (new) target
    study = optuna.load_study(study_name="sigint", storage=storage)
    assert len(counted_trials(study)) == kept + 3 and study.user_attrs["baseline_evaluations"] == 1


def test_a_rung_skipped_for_time_is_decided_by_a_later_run(tmp_path):
    """Out of time, the rung is skipped with its reason but not decided: a later run of the same
    study with time left promotes, and the skip reason is cleared."""
    import time as _time

    from recommender.search.study import Search, StudySpec

    kw = {k: v for k, v in common(tmp_path, "later", trials=3, rungs="2").items() if k != "write_files"}
    search = Search(StudySpec(**kw))
    base = search.baseline()
    search.optimize(base)
    search.deadline = _time.monotonic() + 0.01  # the rung's baseline cannot be trained in 10 ms
    assert search.decide(1, base) == []
    assert search.study.user_attrs.get("promoted_1") is None
    assert "time budget" in search._rung_study(1).user_attrs["skipped"]
    search.deadline = None  # a later run without a time limit
    chosen = search.decide(1, base)
    assert chosen and search.study.user_attrs["promoted_1"] == chosen
    assert search._rung_study(1).user_attrs.get("skipped") is None


def test_auto_rungs_are_sized_to_the_fidelity_and_the_data():
    """--rungs auto: no promotion rung for a smoke dry run, nor where the derived rung would see
    no more of the data (digits at proxy: every image at its native 8 px); one at 32 px when the
    search trains at 16 px."""
    from recommender.protocol import get_protocol
    from recommender.search.rungs import auto_note, parse_ladder

    smoke = ladder(get_protocol("smoke"), 32, "auto", n_train=2854, n_val=951)
    assert len(smoke) == 1 and "dry run" in auto_note(get_protocol("smoke"), smoke, parse_ladder("auto", None, "smoke"))
    digits = ladder(get_protocol("proxy"), 8, "auto", n_train=1347, n_val=450)
    assert len(digits) == 1 and "more epochs alone" in auto_note(get_protocol("proxy"), digits,
                                                                  parse_ladder("auto", None, "proxy"))
    cifar = ladder(get_protocol("proxy"), 32, "auto", n_train=2854, n_val=951)
    assert [r.protocol.input_resolution(32) for r in cifar] == [16, 32]
    assert len(ladder(get_protocol("smoke"), 8, "2", n_train=1347, n_val=450)) == 2  # asked for: given


def test_time_kept_for_promotions_that_no_longer_fit_goes_to_the_search(tmp_path, monkeypatch):
    """The promotions' estimate grows as trials are measured; once it no longer fits the time
    left, the search keeps going (and says so) instead of stopping to keep time for a rung that
    cannot run; a search that ends short of --trials says why."""
    import time as _time

    from recommender.search.study import Search, StudySpec

    kw = {k: v for k, v in common(tmp_path, "reserve", trials=50, rungs="2").items() if k != "write_files"}
    lines: list[str] = []
    search = Search(StudySpec(**kw), log=lines.append)
    base = search.baseline()
    estimates = iter([1.0, 1.0])
    monkeypatch.setattr(search, "promotion_reserve", lambda: next(estimates, 1e6))
    search.deadline = _time.monotonic() + 20.0  # room for 3+ smoke trials on a loaded 2-core CI machine
    search.optimize(base, reserve=search.promotion_reserve)
    assert any("so the search uses all of it" in ln for ln in lines), lines
    assert not any("to leave the promotions their time" in ln for ln in lines), lines
    assert search.study.user_attrs["search_stopped"] == "the time budget (--timeout) ended the search"
    from recommender.report import recommendation_from_study

    rec = recommendation_from_study(search.study)
    assert any(ln.startswith("Searched ") and "of the 50 trials asked" in ln and "same command resumes" in ln
               for ln in rec.run_lines())
