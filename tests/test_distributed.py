"""Many workers on one study over PostgreSQL (Optuna's distributed mode on a real database).

Needs a PostgreSQL server: ``RECOMMENDER_TEST_PG_URL=postgresql://user@host:port/db`` (CI starts
a loopback one with ``.ci/postgres.sh``); skipped without it. The workers get the documented bare
``postgresql://`` form whatever driver the variable names, so a fresh install's default driver
mapping is what is tested. Every worker is the real
``recommend`` command in its own process, with its own weights cache (``--cache-dir``), as on
separate machines. To keep a trial to a few seconds on a shared 2-core machine, the baseline is a
given ``--checkpoint`` (evaluated, never trained: an untrained ResNet-18's weights, which is all
the coordination needs) and the study searches a one-point space (the baseline architecture, no
pruning, fp32) at the ``smoke`` fidelity, so a trial costs its evaluation and measurement only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import step_space

SERVER_URL = os.environ.get("RECOMMENDER_TEST_PG_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not SERVER_URL, reason="RECOMMENDER_TEST_PG_URL is not set (no PostgreSQL server)"),
]

REPO = Path(__file__).resolve().parents[1]

# The tiny search space: every trial reuses the baseline's weights (no training). ``prune.step``
# does nothing at sparsity 0; it is a free continuous dimension, so that two workers proposing
# the same candidates in lockstep (one sampler seed for the whole fleet) would show.
SPACE = step_space("resnet")

# Runs the real CLI and reports how many trials this process ran (its own count, which the
# database does not record per worker).
RUNNER = """\
import sys
from recommender import cli
from recommender.search import study as _study

_run = _study.Search.run

def run(self):
    try:
        return _run(self)
    finally:
        print(f"WORKER_TRIALS={self.trials_run}", file=sys.stderr, flush=True)

_study.Search.run = run
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A fresh, empty database for this module (the workers then also race to create Optuna's
    tables, as a fleet started on a new database does); the server's own database when the
    user may not create one."""
    yield from _fresh_database("recommender_dist")


def _documented(url: Any) -> str:
    """The URL in the documented form, ``postgresql://`` without a driver."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _fresh_database(prefix: str) -> Iterator[str]:
    import sqlalchemy as sa

    from recommender.search.storage import engine_url

    url = sa.engine.make_url(SERVER_URL)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(engine_url(SERVER_URL), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.DBAPIError:
        admin.dispose()
        yield _documented(url)
        return
    try:
        yield _documented(url.set(database=name))
    finally:
        for force in (" WITH (FORCE)", ""):  # FORCE needs PostgreSQL 13
            try:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"{force}'))
                break
            except sa.exc.DBAPIError:
                continue
        admin.dispose()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, pg_database: str) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fleet")
    (root / "space.yaml").write_text(SPACE)
    (root / "runner.py").write_text(RUNNER)
    from recommender.compress.checkpoint import save_state
    from recommender.models import build_model

    save_state(root / "baseline.pt", build_model("resnet18", num_classes=10))
    return {"root": root, "space": root / "space.yaml", "runner": root / "runner.py",
            "checkpoint": root / "baseline.pt", "url": pg_database}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _worker(fleet: dict[str, Any], study: str, trials: int, k: int, *extra: str, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, str(fleet["runner"]), "--model", "resnet18", "--dataset", "digits",
           "--fidelity", "smoke", "--max-drop", "50%", "--budget", "20M-params", "--trials", str(trials),
           "--storage", fleet["url"], "--study-name", study, "--confirm-fidelity", "none", "--no-latency",
           "--no-warm-start", "--space", str(fleet["space"]), "--checkpoint", str(fleet["checkpoint"]),
           "--studies-dir", str(fleet["root"] / f"w{k}"), "--cache-dir", str(fleet["root"] / f"cache-w{k}"),
           "--quiet", *extra]
    path = fleet["root"] / f"{study}-w{k}.log"
    with open(path, "w") as log:
        p = subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    p.log_path = path  # type: ignore[attr-defined]
    return p


def _wait(p: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = None
    out = p.log_path.read_text()  # type: ignore[attr-defined]
    assert rc is not None, f"worker timed out:\n{out[-3000:]}"
    return rc, out


def _worker_trials(out: str) -> int:
    lines = [ln for ln in out.splitlines() if ln.startswith("WORKER_TRIALS=")]
    assert lines, out[-3000:]
    return int(lines[-1].split("=", 1)[1])


def _study(url: str, name: str):
    import optuna

    from recommender.search.storage import engine_url

    return optuna.load_study(study_name=name, storage=engine_url(url))


def _states(url: str, name: str) -> dict[int, str]:
    return {t.number: t.state.name for t in _study(url, name).get_trials(deepcopy=False)}


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def test_two_workers_share_one_study(fleet: dict[str, Any]) -> None:
    url = fleet["url"]
    assert url.startswith("postgresql://"), url  # the documented form, on a fresh install's drivers
    name = f"dist-{uuid.uuid4().hex[:8]}"
    target = 8
    t0 = time.perf_counter()
    procs = [_worker(fleet, name, target, k) for k in (1, 2)]  # started together
    try:
        results = [_wait(p, 240) for p in procs]
    finally:
        _stop(*procs)
    wall = time.perf_counter() - t0
    for rc, out in results:
        assert rc == 0, out[-3000:]
    per_worker = [_worker_trials(out) for _, out in results]

    study = _study(url, name)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), numbers  # no trial number twice
    assert sorted(numbers) == list(range(len(numbers)))
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states, states
    finished = [s for s in states if s in FINISHED]
    assert len(finished) == target, (states, per_worker)
    assert sum(per_worker) == len(finished), per_worker  # every finished trial was run by one worker
    assert study.user_attrs["baseline_evaluations"] == 1  # under the study lock: evaluated once
    assert study.user_attrs["baseline"]["source"] == "checkpoint"
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert complete and all("recipe" in t.user_attrs and "evaluation" in t.user_attrs for t in complete)
    steps = [t.params["prune.step"] for t in trials]
    assert len(set(steps)) == len(steps), steps  # the workers did not sample in lockstep

    show = subprocess.run([sys.executable, "-m", "recommender.cli", "show", name, "--storage", url, "--json"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert show.returncode == 0, show.stderr[-3000:]
    rec = json.loads(show.stdout)
    assert rec["study"]["name"] == name
    assert rec["study"]["finished"] == target and rec["study"]["baseline_evaluations"] == 1
    assert rec["study"]["running"] == 0
    assert rec["recommended"] is not None and rec["recommended"]["trial"] in numbers
    assert "postgresql" in rec["study"]["storage"]

    # The dashboard over the same database shows both workers' trials and the note they wrote.
    from recommender.dashboard import start

    with start(url, "127.0.0.1", 0) as dash:
        page = dash.study_url(name)
        assert page is not None
        sid = page.rsplit("/", 1)[1]
        with urllib.request.urlopen(f"{dash.url}api/studies/{sid}", timeout=30) as r:
            detail = json.loads(r.read())
    assert len(detail["trials"]) == len(trials)
    assert detail["note"]["version"] >= 1 and "Recommendation for resnet18" in detail["note"]["body"]
    attrs = {a["key"] for a in detail["trials"][0]["user_attrs"]}
    assert {"recipe", "evaluation"} <= attrs
    print(f"\n2 workers, {target} trials: per worker {per_worker}, {wall:.0f} s wall")


def test_killed_worker_trial_is_failed_and_retried(fleet: dict[str, Any]) -> None:
    url = fleet["url"]
    name = f"kill-{uuid.uuid4().hex[:8]}"
    target = 6
    hb = ("--heartbeat", "1", "--grace", "3")
    t0 = time.perf_counter()
    victim = _worker(fleet, name, target, 1, *hb)
    survivor = _worker(fleet, name, target, 2, *hb)
    try:
        # Kill the victim while both workers hold a RUNNING trial that has sampled its candidate
        # (each runs one at a time, so one of the two is the victim's). A trial killed before it
        # sampled has nothing to retry (test_interrupted covers it); seen under CI load.
        running: list[int] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and victim.poll() is None:
            try:
                live = [t for t in _study(url, name).get_trials(deepcopy=False) if t.state.name == "RUNNING"]
            except KeyError:  # the study is not created yet
                live = []
            running = [t.number for t in live if "recipe" in t.user_attrs]
            if len(running) == 2:
                break
            time.sleep(0.2)
        assert len(running) == 2, f"never saw both workers mid-trial: {_states(url, name)}"
        os.killpg(victim.pid, signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        killed_at = _states(url, name)
        rc, out = _wait(survivor, 180)
    finally:
        _stop(victim, survivor)
    wall = time.perf_counter() - t0
    assert rc == 0, out[-3000:]

    study = _study(url, name)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    states = {n: t.state.name for n, t in trials.items()}
    # The victim's trial was RUNNING when it died; it must end FAIL (its pid is gone on this
    # machine: failed at the survivor's next trial, without waiting for the heartbeat), never
    # COMPLETE. The trial is found by the worker identity it records, not by the states read
    # after the kill: by then the survivor may already have failed it and moved on.
    victim_trials = [n for n, t in trials.items()
                     if t.user_attrs.get("worker", {}).get("pid") == victim.pid and states[n] != "COMPLETE"]
    assert len(victim_trials) == 1, (victim.pid, running, killed_at, states)
    dead = victim_trials[0]
    assert states[dead] == "FAIL", states
    assert trials[dead].user_attrs.get("interrupted") is True, trials[dead].user_attrs
    assert "RUNNING" not in states.values() and "WAITING" not in states.values(), states
    # ... and it was retried (same parameters) by the surviving worker.
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == dead]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE", states
    assert trials[dead].params.items() <= retries[0].params.items()  # what it had sampled, kept
    # The interrupted trial does not count: the study reaches --trials with trials that finished.
    assert len([s for s in states.values() if s in FINISHED]) == target + 1, states
    assert list(states.values()).count("FAIL") == 1, states
    assert study.user_attrs["baseline_evaluations"] == 1
    print(f"\nkilled worker's trial {dead} -> FAIL, retried as trial {retries[0].number}; "
          f"survivor ran {_worker_trials(out)} trials; {wall:.0f} s wall")


def test_show_does_not_create_tables() -> None:
    """`recommend show` only reads: pointed at an empty database it says so and creates nothing."""
    import sqlalchemy as sa

    from recommender.search.storage import engine_url

    for url in _fresh_database("recommender_empty"):
        if sa.engine.make_url(url).database == sa.engine.make_url(SERVER_URL).database:
            pytest.skip("the server's user may not create a database")
        show = subprocess.run([sys.executable, "-m", "recommender.cli", "show", "anything", "--storage", url],
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert show.returncode == 2 and "holds no Optuna studies" in show.stderr, show.stderr
        engine = sa.create_engine(engine_url(url))
        try:
            assert sa.inspect(engine).get_table_names() == []
        finally:
            engine.dispose()
