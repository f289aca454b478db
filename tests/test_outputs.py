"""Files that say what happened: atomic writes, Markdown that survives `|`, honest counts, the
feasible front read with Optuna's own constraint handling, no global state changed at import."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import optuna
import pytest

from recommender.io import atomic_write
from recommender.report import Recommendation, markdown, recommendation_from_study, summary_line


# -- atomic writes ---------------------------------------------------------------------------------

def test_atomic_write_text_bytes_callback(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    assert atomic_write(p, "héllo\n") == p and p.read_text(encoding="utf-8") == "héllo\n"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write(p, lambda f: f.write(b"cb"))
    assert p.read_bytes() == b"cb"
    atomic_write(p, lambda f: f.write("text cb"), binary=False)
    assert p.read_text() == "text cb"
    assert sorted(os.listdir(p.parent)) == ["a.txt"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "report.md"
    p.write_text("old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["report.md"], "no temporary file left behind"


def test_cache_and_checkpoint_use_the_one_helper():
    import inspect

    import recommender.cache as cache
    import recommender.compress.checkpoint as checkpoint

    for mod in (cache, checkpoint):
        src = inspect.getsource(mod)
        assert "atomic_write" in src and "mkstemp" not in src and "os.replace" not in src.split('"""', 2)[2]
    assert not hasattr(cache, "_suppress")


# -- one Pareto dominance ---------------------------------------------------------------------------

def _study(seed: int = 0, n: int = 60) -> optuna.Study:
    """Random (accuracy, cost) points with constraints stored as the objective stores them (user
    attribute and trial.set_constraint), duplicates included."""
    rng = random.Random(seed)
    study = optuna.create_study(directions=["maximize", "minimize"])
    points = []
    for i in range(n):
        if points and rng.random() < 0.15:
            acc, cost, cons = points[rng.randrange(len(points))]  # an equal point
        else:
            acc, cost = round(rng.uniform(0.3, 0.95), 2), float(rng.randint(1, 40) * 1000)
            cons = [rng.uniform(-1, 0.6), rng.uniform(-1, 0.6)]
        points.append((acc, cost, cons))
        ev = {"recipe": {}, "accuracy": acc, "drop_pp": (0.95 - acc) * 100, "costs": {"params": cost}}
        study.add_trial(optuna.trial.create_trial(
            values=[acc, cost], user_attrs={"recipe": {}, "evaluation": ev, "constraints": cons},
            constraints={"max_drop": cons[0], "budget_params": cons[1]}))
    return study


@pytest.mark.parametrize("seed", range(5))
def test_one_dominance_gives_optunas_front(seed):
    """recommender.pareto.nondominated (the one dominance of promotion, the front and the knee)
    keeps exactly the points Optuna's own best_trials keeps among the feasible trials."""
    from recommender.pareto import nondominated

    study = _study(seed)
    feasible = [t for t in study.trials if all(c <= 0 for c in t.user_attrs["constraints"])]
    ours = {tuple(feasible[i].values) for i in nondominated([(t.values[0], t.values[1]) for t in feasible])}
    assert ours == {tuple(t.values) for t in study.best_trials}


# -- Markdown and wording --------------------------------------------------------------------------

def test_markdown_escapes_pipes_in_every_cell(monkeypatch):
    from recommender.recipe import Recipe

    monkeypatch.setattr(Recipe, "describe", lambda self: "ghost | dws || x")
    study = _study(1, n=20)
    study.set_user_attr("spec", {"model": "m|odel", "dataset": "digits",
                                 "max_drop": {"value": 90.0}, "budgets": [{"metric": "params", "limit": 1e9}]})
    rec = recommendation_from_study(study)
    text = markdown(rec)
    rows = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert rows and any("ghost \\| dws \\|\\| x" in ln for ln in rows)
    for table in _tables(text):
        widths = {_cells(ln) for ln in table}
        assert len(widths) == 1, table  # no row gained a column from an unescaped |


def _tables(text: str) -> list[list[str]]:
    tables, cur = [], []
    for ln in text.splitlines():
        if ln.startswith("|"):
            cur.append(ln)
        elif cur:
            tables.append(cur)
            cur = []
    return tables + ([cur] if cur else [])


def _cells(line: str) -> int:
    return len(line.replace("\\|", "").strip().strip("|").split("|"))


def test_summary_counts_evaluated_candidates():
    one = summary_line({"finished": 1, "evaluated": 1, "sampled": 1, "feasible": 1, "confirmed": 0})
    assert one.startswith("1 candidate evaluated (1 chosen by the sampler): 1 feasible")
    s = summary_line({"finished": 7, "evaluated": 3, "sampled": 2, "feasible": 2, "infeasible": 1, "pruned": 3,
                      "failed": 1, "running": 2, "confirmed": 2}, rungs=2)
    assert s.startswith("3 candidates evaluated (2 chosen by the sampler): 2 feasible, 1 infeasible")
    assert "3 skipped before training" in s and "1 failed" in s
    assert "2 still running" in s and "2 promoted to higher rungs (2 rungs in all)" in s
    assert "stopped before the end" not in s
    s = summary_line({"finished": 2, "evaluated": 1, "sampled": 1, "feasible": 1, "interrupted": 1})
    assert "0 failed; 1 stopped before the end (Ctrl-C, a killed worker or the time budget) and queued again" in s


def test_write_outputs_removes_a_stale_recipe(tmp_path):
    from tests.helpers import evaluation, synthetic_study

    from recommender.api import write_outputs

    def rec_of(drop_pct: str, name: str):
        return recommendation_from_study(synthetic_study(
            tmp_path, base=0.9, max_drop=drop_pct, budgets=["1M-params"], name=name,
            cands={0: {0: evaluation(0.88, 1e3, 0.9)}, 1: {0: evaluation(0.85, 500.0, 0.9)}}))

    rec = rec_of("3%", "a")
    assert rec.feasible
    files = write_outputs(rec, tmp_path, plots=False)
    assert files["recipe"].is_file() and rec.files["recipe"] == str(tmp_path / "recipe.json")
    assert json.loads(files["recipe"].read_text())["num_classes"] == 10

    infeasible = rec_of("1%", "b")
    assert not infeasible.feasible
    files = write_outputs(infeasible, tmp_path, plots=False)
    assert "recipe" not in files and not (tmp_path / "recipe.json").exists()
    assert "Nothing feasible was found" in (tmp_path / "report.md").read_text()


# -- no global state at import ---------------------------------------------------------------------

def test_import_changes_no_logging_or_warning_filters():
    script = textwrap.dedent("""
        import importlib, logging, pkgutil, warnings
        import optuna, torch
        # third-party imports may install filters of their own: import them first
        for m in ("torchvision", "torch_pruning", "fvcore.nn", "sklearn", "pandas", "matplotlib", "rich",
                  "optuna_dashboard", "torch.ao.quantization", "torch.ao.quantization.quantize_fx", "sqlalchemy",
                  "filelock", "yaml"):
            importlib.import_module(m)
        optuna.logging.set_verbosity(optuna.logging.DEBUG)  # the user's choice
        filters = list(warnings.filters)
        handlers = list(logging.getLogger().handlers)
        import recommender
        names = [m.name for m in pkgutil.walk_packages(recommender.__path__, "recommender.")]
        for name in names:
            importlib.import_module(name)
        assert len(names) > 20, names
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG, optuna.logging.get_verbosity()
        new = [f for f in warnings.filters if f not in filters]
        assert not new and len(warnings.filters) == len(filters), new
        assert logging.getLogger().handlers == handlers
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_command_environment_is_restored():
    import logging
    import warnings

    from recommender.cli import command_environment

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    before = list(warnings.filters)
    optuna_handlers = list(logging.getLogger("optuna").handlers)
    with command_environment(verbose=False):
        assert optuna.logging.get_verbosity() == optuna.logging.ERROR
        assert len(warnings.filters) > len(before)
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    assert warnings.filters == before
    assert not logging.getLogger("recommender").handlers
    assert logging.getLogger("optuna").handlers == optuna_handlers


def test_plots_and_dashboard_figure(tmp_path):
    """pareto.png always; with plotly, pareto.html and the figure attached to the study for
    optuna-dashboard beside the note."""
    from PIL import Image

    from recommender.api import _save_dashboard_note, write_outputs
    from recommender.plot import plotly_available

    from tests.helpers import baseline, evaluation, synthetic_study

    cands = {i: {0: evaluation(0.80 + 0.01 * (i % 7), 1e3 * (i + 1), 0.85)} for i in range(12)}
    for i in (3, 5):
        cands[i][1] = evaluation(0.84, 1e3 * (i + 1), 0.86)
    study = synthetic_study(tmp_path, base=0.85, max_drop="2%", budgets=["8k-params"], cands=cands,
                            rungs={1: baseline(0.86)})
    rec = recommendation_from_study(study)
    files = write_outputs(rec, tmp_path)
    with Image.open(files["plot"]) as im:
        assert im.format == "PNG" and im.size[0] > 100
    _save_dashboard_note(study, rec)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert any(k.startswith("dashboard:note_str") for k in attrs)
    if not plotly_available():
        pytest.skip("plotly is not installed (pip install -e '.[plots]'): no pareto.html, no dashboard figure")
    html = files["plot_html"].read_text()
    assert "<html" in html[:500].lower() and "plotly" in html
    assert any(k.startswith("dashboard:plot_data:pareto-front") for k in attrs)


def test_sqlite_study_lock_excludes_without_fcntl(tmp_path):
    """The lock beside a SQLite study (filelock: also on Windows) lets one holder in at a time."""
    import threading
    import time

    import recommender.search.lock as lock

    assert "fcntl" not in vars(lock)
    url = f"sqlite:///{tmp_path / 's.db'}"
    spans: list[tuple[float, float]] = []

    def hold() -> None:
        with lock.study_lock(url, "study", "baseline"):
            t0 = time.monotonic()
            time.sleep(0.3)
            spans.append((t0, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    spans.sort()
    assert len(spans) == 3
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def test_a_pruned_answer_says_how_settled_its_pruning_drop_is():
    """A pruning drop measured only at the search rung, from the baseline that rung trained
    briefly, carries a note (benchmarks: several pp off the long-trained references, both ways);
    not when the baseline is the user's checkpoint or a higher rung re-measured it. From a
    checkpoint, the note says the drop follows a short recovery fine-tune, at every rung."""
    from recommender.evaluation import Baseline, Evaluation
    from recommender.recipe import PruneConfig, Recipe
    recipe = Recipe(prune=PruneConfig("unstructured-l1", 0.5))
    ev = Evaluation(recipe=recipe.to_dict(), accuracy=0.9, acc_low=0.87, acc_high=0.93, drop_pp=1.0,
                    drop_low_pp=0.2, drop_high_pp=1.8, costs={"params": 1000})

    def explained(source: str, rungs: list) -> str:
        from recommender.ledger import Ledger, RungInfo
        from recommender.question import Question
        from recommender.constraints import MaxDrop

        base = Baseline(accuracy=0.91, acc_low=0.88, acc_high=0.94, costs={"params": 1000}, source=source,
                        fidelity="proxy")
        infos = [RungInfo(k, "proxy" if k == 0 else "proxy+r1", base) for k in range(1 + len(rungs))]
        led = Ledger.build(Question.of("resnet18", "digits", MaxDrop(2.0), ()), infos,
                           [(0, recipe, None, {k: ev for k in range(1 + len(rungs))})])
        rec = Recommendation(study_name="s", storage="", ledger=led, counts={"finished": 1})
        assert rec.feasible
        return " ".join(rec.explain(width=400).split())
    note = "the pruning drop is measured from the baseline as this rung trains it"
    assert note in explained("trained", [])
    assert note not in explained("checkpoint", [])
    assert note not in explained("trained", ["r1"])
    # from the user's checkpoint the drop follows a short recovery fine-tune: said, with what it was worth
    ckpt_note = "the pruning drop is measured from your checkpoint after the rung's short recovery"
    assert ckpt_note in explained("checkpoint", [])
    assert ckpt_note in explained("checkpoint", ["r1"])
    assert ckpt_note not in explained("trained", [])
