"""Interrupted and resumed studies on SQLite: every way a run can stop mid-trial (kill -9,
Ctrl-C, SIGTERM) ends, after the same command is run again, with the study at its target and
every candidate evaluated once; a resumed or parallel run explores instead of replaying.

A trial here is an evaluation of a tiny CNN given as a checkpoint (no training). The worker that
gets interrupted runs the real command in its own process with ``RECOMMENDER_TEST_SLOW_S`` making
each forward pass slow (a trial then lasts seconds, long enough to be caught mid-way); the runs
before and after it are fast and in-process. Run with ``-s`` to see the trial tables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from recommender.cli import main
from recommender.errors import Terminated
from recommender.search.recovery import counted_trials, worker_alive, worker_identity
from tests.helpers import interruptible_child, step_space

REPO = Path(__file__).resolve().parents[1]
MODEL = "tests.helpers:SlowCNN"
STUDY = "interrupt-me"
SPACE = step_space("custom")
#: seconds each eval-mode forward pass of the interrupted worker's model sleeps: a trial lasts long
#: enough that the signal lands inside it also on a loaded machine (at 0.3 s a trial once finished
#: between the test seeing it and the kill, under CI load)
SLOW_S = 1.5


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import torch

    from recommender.compress.checkpoint import save_state
    from tests.helpers import SlowCNN

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("RECOMMENDER_TEST_SLOW_S", raising=False)
    (tmp_path / "space.yaml").write_text(SPACE)
    torch.manual_seed(0)
    save_state(tmp_path / "ckpt.pt", SlowCNN(10))
    return {"root": tmp_path, "db": tmp_path / "studies" / f"{STUDY}.db"}


def argv(setup: dict[str, Any], trials: int, *extra: str) -> list[str]:
    root = setup["root"]
    return ["--model", MODEL, "--budget", "20M-params", "--max-drop", "50%", "--fidelity", "smoke",
            "--trials", str(trials), "--confirm-fidelity", "none", "--no-latency", "--no-warm-start",
            "--space", str(root / "space.yaml"), "--checkpoint", str(root / "ckpt.pt"), "--study-name", STUDY,
            "--studies-dir", str(root / "studies"), "--quiet", "--json", *extra]


def run_here(capsys: pytest.CaptureFixture[str], args: list[str]) -> int:
    code = main(args)
    capsys.readouterr()
    return code


def start_worker(setup: dict[str, Any], trials: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               RECOMMENDER_TEST_SLOW_S=str(SLOW_S), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = open(setup["root"] / "worker.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "recommender.cli", *argv(setup, trials)], cwd=REPO, env=env,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         preexec_fn=interruptible_child)
    log.close()
    return p


def study(setup: dict[str, Any]) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{setup['db']}")


def wait_mid_trial(setup: dict[str, Any], p: subprocess.Popen, timeout: float = 240) -> int:
    """The number of the trial worker ``p`` is running, once it has run for a moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        for t in study(setup).get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            w = t.user_attrs.get("worker")
            if w and w["pid"] == p.pid and "recipe" in t.user_attrs:
                time.sleep(0.5)  # inside its evaluation (each forward pass takes SLOW_S)
                return t.number
        time.sleep(0.1)
    raise AssertionError(f"worker never ran a trial:\n{(setup['root'] / 'worker.log').read_text()[-3000:]}")


def table(setup: dict[str, Any], title: str) -> tuple[list[tuple], str]:
    """(number, state, prune.step, retry_of, interrupted) for every trial, and as text."""
    rows = [(t.number, t.state.name, round(t.params.get("prune.step", float("nan")), 4),
             t.user_attrs.get("retry_of"), t.user_attrs.get("interrupted"))
            for t in study(setup).get_trials(deepcopy=False)]
    text = f"\n{title}\n  #  state     prune.step  retry_of  interrupted\n"
    text += "\n".join(f"  {r[0]:<2} {r[1]:<9} {r[2]:<11} {str(r[3]):<9} {r[4]}" for r in rows)
    return rows, text


def check_reached(setup: dict[str, Any], target: int, victim: int) -> None:
    s = study(setup)
    trials = s.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states, states
    assert len(counted_trials(s)) == target, states
    dead = trials[victim]
    assert dead.state.name == "FAIL" and dead.user_attrs.get("interrupted") is True, dead.user_attrs
    retries = [t for t in trials if t.user_attrs.get("retry_of") == victim]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE", states
    assert retries[0].params == dead.params  # the same candidate, run again
    done = [t.params["prune.step"] for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == len(set(done)) == target  # every candidate evaluated once


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C", "SIGTERM"])
def test_interrupted_trial_is_retried_and_not_counted(setup, capsys, how):
    target = 3
    assert run_here(capsys, argv(setup, 1)) == 0  # the baseline and trial 0, fast
    p = start_worker(setup, target)
    try:
        victim = wait_mid_trial(setup, p)
        sig = {"kill -9": signal.SIGKILL, "Ctrl-C": signal.SIGINT, "SIGTERM": signal.SIGTERM}[how]
        os.kill(p.pid, sig)
        rc = p.wait(60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    log = (setup["root"] / "worker.log").read_text()
    expected = {"kill -9": -signal.SIGKILL, "Ctrl-C": 130, "SIGTERM": 143}[how]
    assert rc == expected, log[-3000:]
    if how != "kill -9":
        word = "interrupted" if how == "Ctrl-C" else "terminated"
        assert f"recommend: {word}; finished trials are saved in" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    before, shown = table(setup, f"{how}: after the interrupt")
    assert before[victim][1] == ("RUNNING" if how == "kill -9" else "FAIL"), before
    assert run_here(capsys, argv(setup, target)) == 0  # the same command again, at once
    _, after = table(setup, f"{how}: after the same command again")
    print(shown + after)  # with -s: the trial tables before and after
    check_reached(setup, target, victim)


def test_worker_liveness() -> None:
    me = worker_identity()
    assert worker_alive(me) is True
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert worker_alive({**me, "pid": child.pid, "start": None}) is False  # gone (and reaped)
    assert worker_alive({**me, "start": (me["start"] or 0) + 1}) is (me["start"] is None)  # a reused pid
    assert worker_alive({**me, "machine": "another-host/x/y"}) is None  # only its heartbeat can tell


# -- sampler seeds (resumed and parallel runs explore) -------------------------------------------

def steps(setup: dict[str, Any]) -> list[float]:
    return [t.params["prune.step"] for t in study(setup).get_trials(deepcopy=False)]


def test_resumed_run_explores_and_fresh_run_reproduces(setup, capsys, tmp_path):
    assert run_here(capsys, argv(setup, 2)) == 0
    first = steps(setup)
    assert run_here(capsys, argv(setup, 4)) == 0  # resumed: two more
    resumed = steps(setup)
    print(f"\nresumed study: prune.step of trials 0-1 {first}, of trials 2-3 {resumed[2:]}")
    assert resumed[:2] == first and len(set(resumed)) == 4, resumed  # no replay of trials 0-1
    again = dict(setup, db=tmp_path / "again" / f"{STUDY}.db")
    args = argv(setup, 2)
    args[args.index("--studies-dir") + 1] = str(tmp_path / "again")
    assert run_here(capsys, args) == 0  # a fresh single run with the same seed: the same candidates
    assert steps(again) == first


def test_two_workers_on_one_study_do_not_propose_in_lockstep(setup):
    from recommender.models import resolve_model
    from recommender.search.study import StudySpec, open_study, sampler_seed

    spec = StudySpec(model=resolve_model(MODEL, num_classes=10), max_drop="50%", budgets=["20M-params"],
                     fidelity="smoke", study_name=STUDY, studies_dir=str(setup["root"] / "studies"),
                     checkpoint=str(setup["root"] / "ckpt.pt"))
    a, b = open_study(spec), open_study(spec)  # two processes opening the study together
    assert study(setup).user_attrs["runs"] == 2
    ta, tb = a.ask(), b.ask()
    assert ta.suggest_float("x", 0, 1) != tb.suggest_float("x", 0, 1)
    # the seeds: a fresh study's first run keeps --seed; everything else differs, deterministically
    fresh = optuna.create_study()
    assert sampler_seed(7, fresh) == 7
    seeds = {sampler_seed(7, fresh, worker=w, run=r) for w in range(3) for r in range(3)}
    assert len(seeds) == 9 and sampler_seed(7, fresh, worker=2) == sampler_seed(7, fresh, worker=2)
    assert sampler_seed(7, a) != sampler_seed(8, a) and 0 <= sampler_seed(7, a) < 2**32


def test_orphan_trial_is_failed_and_its_queued_params_kept(tmp_path):
    """A trial created by Optuna but interrupted before the objective began records no worker
    and no heartbeat: it is failed once old enough, and its queued parameters queued again."""
    from recommender.search.recovery import reap_dead_trials

    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", directions=["maximize", "minimize"])
    s.enqueue_trial({"x": 0.25})
    orphan = s.ask()  # popped from the queue, never run
    assert reap_dead_trials(s, orphan_after_s=3600) == []  # young: could be a live ask
    assert reap_dead_trials(s, orphan_after_s=0) == [orphan.number]
    trials = s.get_trials(deepcopy=False)
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["interrupted"] is True
    assert trials[1].state.name == "WAITING" and trials[1].user_attrs["retry_of"] == 0
    assert trials[1].system_attrs["fixed_params"] == {"x": 0.25}
    assert counted_trials(s) == []


def test_a_dead_workers_trial_that_sampled_nothing_is_failed_and_not_queued(tmp_path):
    """A worker killed after its trial began but before it sampled a parameter (a sampled, not an
    enqueued, trial): nothing to repeat, so the trial is failed as interrupted, does not count,
    and nothing is queued; its reason says so. An enqueued one keeps what it was queued with."""
    from recommender.search.recovery import WORKER_ATTR, reap_dead_trials

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = {**worker_identity(), "pid": child.pid, "start": None}
    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'n.db'}", directions=["maximize", "minimize"])
    blank = s.ask()
    blank.set_user_attr(WORKER_ATTR, dead)
    s.enqueue_trial({"x": 0.5})
    queued = s.ask()
    queued.set_user_attr(WORKER_ATTR, dead)
    assert sorted(reap_dead_trials(s)) == [blank.number, queued.number]
    trials = s.get_trials(deepcopy=False)
    assert [t.state.name for t in trials[:2]] == ["FAIL", "FAIL"]
    assert trials[0].user_attrs["interrupted"] is True
    assert "nothing is queued again" in trials[0].user_attrs["fail_reason"], trials[0].user_attrs
    assert "queued again" in trials[1].user_attrs["fail_reason"]
    assert len(trials) == 3 and trials[2].state.name == "WAITING" and trials[2].user_attrs["retry_of"] == 1
    assert trials[2].system_attrs["fixed_params"] == {"x": 0.5}
    assert counted_trials(s) == []


def test_a_trial_its_worker_queued_again_before_it_was_killed_is_queued_once(tmp_path):
    """A worker records its interrupted trial (queued again) and is killed before the trial is
    failed (its coordinator's grace period ran out): the reaper fails it without a second copy."""
    from recommender.search.recovery import WORKER_ATTR, reap_dead_trials, requeue

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'q.db'}", directions=["maximize", "minimize"])
    t = s.ask()
    t.suggest_float("x", 0, 1)
    t.set_user_attr(WORKER_ATTR, {**worker_identity(), "pid": child.pid, "start": None})
    requeue(s, t.params, t.number, t.user_attrs, died=False)  # what mark_interrupted does first
    assert reap_dead_trials(s) == [t.number]
    trials = s.get_trials(deepcopy=False)
    assert [x.state.name for x in trials] == ["FAIL", "WAITING"], trials
    assert trials[1].user_attrs["retry_of"] == t.number


def test_interrupt_while_another_process_holds_the_sqlite_write_lock(tmp_path):
    """Another process (a worker, a reader's transaction) holds SQLite's write lock longer than
    sqlite3's default 5 s wait while an interrupted trial is told its result: the interrupt still
    goes through (before, the tell failed on the lock and Optuna raised "Should not reach")."""
    import sqlite3
    import threading

    from recommender.search.storage import open_storage

    db = tmp_path / "lock.db"
    st = open_storage(f"sqlite:///{db}", heartbeat=False)
    study_ = optuna.create_study(storage=st)
    held = threading.Event()

    def hold() -> None:
        con = sqlite3.connect(db)
        con.execute("BEGIN IMMEDIATE")  # the write lock; readers go on
        held.set()
        time.sleep(6)
        con.rollback()
        con.close()

    def objective(trial: optuna.Trial) -> float:
        threading.Thread(target=hold).start()
        held.wait(10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study_.optimize(objective, n_trials=1)
    assert study_.trials[0].state == optuna.trial.TrialState.FAIL


class _InterruptOnFirstTrial(optuna.samplers.RandomSampler):
    """Sends this process SIGINT while Optuna creates the first trial (after the trial exists in
    storage, before the objective runs): the window a loaded SQLite study makes wide."""

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number == 0:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # without the guard the interrupt is raised here


@pytest.mark.parametrize("guarded", [True, False])
def test_ctrl_c_while_a_trial_is_created_leaves_no_running_trial(tmp_path, guarded):
    """Ctrl-C during trial creation: with the guard the trial records its worker first, is then
    failed as interrupted and its queued parameters are queued again; without it (Optuna alone)
    the trial stays RUNNING with no worker, which is what the guard is for."""
    from recommender.search.recovery import guard_trial_creation, interruptible

    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'g.db'}", sampler=_InterruptOnFirstTrial(seed=0))
    s.enqueue_trial({"x": 0.25})
    if guarded:
        guard_trial_creation(s)
    ran = []
    # Python's own Ctrl-C handler: a shell starts background jobs (CI's runner too) with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            s.optimize(interruptible(lambda t: ran.append(t.number) or t.suggest_float("x", 0, 1)), n_trials=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ran == []
    first = s.get_trials(deepcopy=False)[0]
    if not guarded:
        assert first.state.name == "RUNNING" and "worker" not in first.user_attrs
        return
    assert first.state.name == "FAIL" and first.user_attrs["interrupted"] is True
    assert first.user_attrs["worker"] == worker_identity()
    retry = s.get_trials(deepcopy=False)[1]
    assert retry.state.name == "WAITING" and retry.system_attrs["fixed_params"] == {"x": 0.25}
    assert counted_trials(s) == []


def test_release_own_trials_fails_only_this_workers_running_trials(tmp_path):
    """After an interrupt a worker finishes the trials it still runs (the interrupt landed
    outside the objective): one whose result was stored is completed from it, one without is
    failed as interrupted and queued again; another worker's running trial is left alone."""
    from recommender.search.recovery import release_own_trials

    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}")
    s.enqueue_trial({"x": 0.5})
    mine, done, other = s.ask(), s.ask(), s.ask()
    for t in (mine, done):
        t.set_user_attr("worker", worker_identity())
    done.set_user_attr("evaluation", {"ok": True, "accuracy": 0.75})
    done.set_user_attr("constraints", [0.0])
    other.set_user_attr("worker", {**worker_identity(), "pid": worker_identity()["pid"] + 1})
    assert release_own_trials(s, lambda ev: [ev["accuracy"]]) == [mine.number, done.number]
    trials = s.get_trials(deepcopy=False)
    assert trials[mine.number].state.name == "FAIL" and trials[mine.number].user_attrs["interrupted"] is True
    assert trials[done.number].state.name == "COMPLETE" and trials[done.number].value == 0.75
    assert trials[other.number].state.name == "RUNNING"
    assert trials[-1].state.name == "WAITING" and trials[-1].system_attrs["fixed_params"] == {"x": 0.5}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped one, on purpose
def test_a_ctrl_c_that_cpython_drops_is_raised_at_the_next_training_step():
    """CPython drops an exception raised inside a weakref callback ("Exception ignored in"): a
    Ctrl-C whose handler runs there was lost and the run went on (seen under load in CI, inside
    SQLAlchemy's class-registry clean-up). The CLI's handler records it; the next training step
    raises it again, once."""
    import gc
    import weakref

    import torch

    from recommender import interrupts
    from recommender.data import load_dataset
    from recommender.protocol import get_protocol
    from recommender.train import train_model
    from tests.helpers import TinyCNN

    class Obj:
        pass

    handler = interrupts.handler(KeyboardInterrupt)
    interrupts.clear()
    try:
        obj = Obj()
        ref = weakref.ref(obj, lambda r: handler(signal.SIGINT, None))  # noqa: F841 (kept alive)
        del obj  # the callback raises KeyboardInterrupt; CPython prints and drops it
        gc.collect()
        assert interrupts.requested()
        torch.manual_seed(0)
        with pytest.raises(KeyboardInterrupt):
            train_model(TinyCNN(), load_dataset("digits"), get_protocol("smoke", threads=1))
        assert not interrupts.requested()  # raised once: clean-up code is not interrupted again
        interrupts.check()  # nothing pending: no exception
        kind = interrupts.handler(Terminated)
        with pytest.raises(Terminated):
            kind(signal.SIGTERM, None)
        with pytest.raises(Terminated):
            interrupts.check()  # the same kind again
    finally:
        interrupts.clear()


def test_a_dropped_ctrl_c_is_not_printed_as_a_traceback():
    """The CLI's unraisable hook says nothing of an interrupt CPython dropped while it is recorded
    (it is raised again and reported in one line); any other unraisable goes to the previous hook."""
    import gc
    import sys
    import weakref

    from recommender import interrupts

    class Obj:
        pass

    seen: list[type] = []
    before = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_type)
    interrupts.quiet_dropped()
    interrupts.clear()
    try:
        for callback, kind in ((lambda r: interrupts.handler(KeyboardInterrupt)(signal.SIGINT, None), None),
                               (lambda r: 1 / 0, ZeroDivisionError)):
            obj = Obj()
            ref = weakref.ref(obj, callback)  # noqa: F841 (kept alive)
            del obj
            gc.collect()
            assert seen == ([] if kind is None else [kind])
        assert interrupts.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    finally:
        sys.unraisablehook = before
        interrupts.clear()


def test_a_workers_handlers_take_the_first_of_two_stops_only():
    """A --jobs worker gets Ctrl-C from the terminal's process group and then SIGTERM from its
    coordinator: the first interrupts, the second is ignored (it would break the recording of the
    interrupted trial); a fresh take-over (clear) arms the handlers again."""
    from recommender import interrupts

    interrupts.clear()
    try:
        ctrl_c, term = interrupts.handler(KeyboardInterrupt, once=True), interrupts.handler(Terminated, once=True)
        with pytest.raises(KeyboardInterrupt):
            ctrl_c(signal.SIGINT, None)
        term(signal.SIGTERM, None)  # ignored: no exception
        ctrl_c(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt) as first:
            interrupts.check()  # the first one stays recorded, of its own kind
        assert type(first.value) is KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):  # without once, every signal interrupts
            interrupts.handler(KeyboardInterrupt)(signal.SIGINT, None)
        interrupts.clear()
        with pytest.raises(Terminated):
            term(signal.SIGTERM, None)
    finally:
        interrupts.clear()
