"""The command's first minute and the truth of its output: help, version, exit codes a pipeline can
trust (0 feasible, 1 nothing feasible, 2 bad input, 130 interrupted), files that say what happened
(recipe.json only for a feasible answer), the Pareto plot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import interruptible_child

from recommender.cli import main

torch.set_num_threads(2)

TESTS = Path(__file__).parent
# A tiny user model (tests/helpers.py: TinyCNN) makes a study of two smoke trials take seconds.
MODEL = "helpers:TinyCNN"
SPACE = textwrap.dedent("""
    family: generic
    prune:
      method: {choices: [none, structured-channel]}
      sparsity: {low: 0.25, high: 0.5, step: 0.25, when: {method: structured-channel}}
    quant:
      scheme: {choices: [fp32]}
    warm_start: []
""")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["COLUMNS"] = "100"
    return env


def _cli(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recommender.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=_env())


# -- help and version ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--version"], ["ablate", "--help"], ["show", "--help"],
                                  ["apply", "--help"], ["dashboard", "--help"], ["apply", "-h"]])
def test_help_and_version_exit_zero(argv):
    proc = _cli(*argv)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip()


def test_help_lists_commands_and_version_string():
    from recommender import __version__

    out = _cli("--help").stdout
    for cmd in ("ablate", "show", "apply", "dashboard"):
        assert any(line.strip().startswith(cmd + " ") for line in out.splitlines()), (cmd, out)
    for flag in ("--model", "--budget", "--max-drop", "--weights", "--verbose", "--quiet", "--json"):
        assert flag in out
    assert "exit codes" in out
    assert _cli("--version").stdout.strip() == f"recommend {__version__}"


def test_every_option_has_help():
    """No option of the command or of a subcommand is listed without a description."""
    from recommender.cli import build_parser

    parser = build_parser()
    parsers = [parser] + list(next(a for a in parser._actions if a.dest == "command").choices.values())
    for p in parsers:
        for action in p._actions:
            if action.option_strings:
                assert action.help, (p.prog, action.option_strings)


def test_main_job_needs_model_and_budget(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model and --budget" in err


# -- exit codes and outputs of real (tiny) studies -------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit")
    space = root / "space.yaml"
    space.write_text(SPACE)
    common = ["--model", MODEL, "--fidelity", "smoke", "--no-warm-start", "--no-latency", "--trials", "2",
              "--space", str(space), "--confirm-fidelity", "none", "--studies-dir", str(root / "studies")]
    return root, common


def test_exit_0_feasible_writes_recipe_report_and_plot(tiny, capsys):
    from PIL import Image

    root, common = tiny
    code = main([*common, "--budget", "1M-params", "--max-drop", "50%", "--study-name", "ok"])
    out = capsys.readouterr().out
    assert code == 0, out
    folder = root / "studies" / "ok"
    assert (folder / "recipe.json").is_file()
    assert f"Recipe: {folder / 'recipe.json'}" in out and "Apply: recommend apply" in out
    assert json.loads((folder / "recipe.json").read_text())["feasible"] is True
    assert (folder / "report.md").is_file() and (folder / "report.json").is_file()
    png = folder / "pareto.png"
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert not list(folder.glob(".*.tmp")), "temporary files of atomic writes are cleaned up"

    # --json: the same exit code, and the files that were written
    assert main([*common, "--budget", "1M-params", "--max-drop", "50%", "--study-name", "ok", "--json",
                 "--quiet"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["feasible"] is True and d["files"]["recipe"] == str(folder / "recipe.json")


def test_exit_1_nothing_feasible_no_recipe(tiny, capsys):
    root, common = tiny
    folder = root / "studies" / "impossible"
    folder.mkdir(parents=True)
    (folder / "recipe.json").write_text('{"stale": true}')  # an earlier answer's recipe
    # 1.3k params: above the smallest cost the space can reach (1.23k, best case), below every draft
    code = main([*common, "--budget", "1.3k-params", "--max-drop", "1%", "--study-name", "impossible"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "Recipe:" not in out and "recommend apply" not in out
    assert "nothing feasible" in out.lower()
    assert not (folder / "recipe.json").exists(), "a stale recipe.json must not survive an infeasible answer"
    assert "Nothing feasible was found" in (folder / "report.md").read_text()
    assert (folder / "pareto.png").stat().st_size > 0

    assert main([*common, "--budget", "1.3k-params", "--max-drop", "1%", "--study-name", "impossible",
                 "--json", "--quiet"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["feasible"] is False and "recipe" not in d["files"]

    # below the space's floor the question is refused before any training: exit 1, one line naming it
    assert main([*common, "--budget", "1k-params", "--max-drop", "1%", "--study-name", "below-floor"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and "smallest params this search space reaches" in cap.err
    assert not (root / "studies" / "below-floor").exists()


def test_exit_1_when_a_higher_rung_rejects_every_candidate(monkeypatch, capsys, tmp_path):
    """A chosen recipe that is NOT FEASIBLE (feasible at the search rung, rejected on the rung it
    was promoted to) exits 1, with and without --json: the exit code follows rec.feasible."""
    import recommender.api as api
    from recommender.report import recommendation_from_study
    from tests.helpers import baseline, evaluation, synthetic_study

    study = synthetic_study(tmp_path, base=0.53, max_drop="2%", budgets=["5M-params"],
                            cands={0: {0: evaluation(0.52, 1000, 0.53), 1: evaluation(0.5, 1000, 0.53)}},
                            rungs={1: baseline(0.53)})
    rec = recommendation_from_study(study)
    assert not rec.feasible
    monkeypatch.setattr(api, "recommend", lambda *a, **k: rec)
    argv = ["--model", "resnet18", "--budget", "5M-params", "--studies-dir", str(tmp_path), "--quiet"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "Nothing feasible" in out and "Recipe:" not in out
    assert main([*argv, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["feasible"] is False


def test_exit_2_bad_input(tiny, capsys):
    root, common = tiny
    assert main([*common, "--budget", "5 parameters"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "malformed budget" in err


def test_exit_130_on_sigint(tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    argv = [sys.executable, "-m", "recommender.cli", "--model", MODEL, "--budget", "1M-params", "--max-drop", "50%",
            "--fidelity", "smoke", "--no-warm-start", "--no-latency", "--trials", "200", "--space",
            str(tmp_path / "space.yaml"), "--confirm-fidelity", "none", "--studies-dir", str(tmp_path / "studies")]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         preexec_fn=interruptible_child)
    try:
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:  # the search has started: its first log line
            line = p.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "evaluating the baseline" in line:
                break
        assert any("evaluating the baseline" in s for s in seen), "".join(seen)
        p.send_signal(signal.SIGINT)
        # communicate drains both pipes while waiting: a child whose progress output fills a pipe
        # nobody reads would block on the write and never exit (seen once in CI under load)
        _, rest = p.communicate(timeout=60)
        rc = p.returncode
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 130, rest[-2000:]
    assert "interrupted" in rest and "Traceback" not in rest
