"""Bad input: one clear line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import io
import os
import json
import subprocess
import sys

import pytest

from recommender.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, needle):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "resnet7", "--budget", "5M-params"], "unknown model 'resnet7'"),
    (["--model", "resnet101", "--budget", "5 parameters"], "malformed budget"),
    (["--model", "resnet101", "--budget", "5M-params", "--max-drop", "two"], "malformed max drop"),
    (["--model", "resnet101", "--budget", "5M-params", "--fidelity", "ultra"], "unknown fidelity"),
    (["--model", "resnet101", "--budget", "5M-params", "--sampler", "grid"], "unknown sampler"),
    (["--model", "resnet101"], "--budget"),
    (["--model", "resnet101", "--budget", "5M-params", "--timeout", "soon"], "malformed duration"),
])
def test_bad_arguments(capsys, tmp_path, argv, needle):
    code, _, err = run(capsys, *argv, "--studies-dir", str(tmp_path))
    assert_one_line_error(code, err, needle)
    assert not list(tmp_path.glob("*.db")), "no study may be created for bad input"


def test_missing_dataset(capsys, tmp_path):
    code, _, err = run(capsys, "--model", "resnet18", "--budget", "5M-params", "--dataset",
                       f"imagefolder:{tmp_path}/nothing", "--studies-dir", str(tmp_path))
    assert_one_line_error(code, err, "nothing")


def test_cifar_offline_says_how_to_get_it(capsys, tmp_path):
    code, _, err = run(capsys, "--model", "resnet18", "--budget", "5M-params", "--dataset", "cifar10",
                       "--data-dir", str(tmp_path / "none"), "--studies-dir", str(tmp_path))
    assert_one_line_error(code, err, "cifar10")


def test_unreachable_storage(capsys, tmp_path):
    code, _, err = run(capsys, "--model", "resnet18", "--budget", "5M-params", "--fidelity", "smoke",
                       "--storage", "postgresql+psycopg2://nobody:secret@127.0.0.1:1/none",
                       "--studies-dir", str(tmp_path))
    assert_one_line_error(code, err, "cannot open storage")
    assert "secret" not in err


def test_corrupt_checkpoint(capsys, tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    code, _, err = run(capsys, "--model", "resnet18", "--budget", "5M-params", "--fidelity", "smoke",
                       "--checkpoint", str(bad), "--trials", "1", "--no-warm-start", "--no-latency",
                       "--confirm-fidelity", "none", "--studies-dir", str(tmp_path))
    assert_one_line_error(code, err, "corrupt")


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"recipe": {"arch": {"block": "wormhole"}}}), "invalid recipe"),
    (json.dumps({"recipe": {"prune": {"sparsity": 3}}}), "invalid recipe"),
    (json.dumps([1, 2]), "recipe"),
])
def test_corrupt_recipe(capsys, tmp_path, content, needle):
    p = tmp_path / "recipe.json"
    p.write_text(content)
    code, _, err = run(capsys, "apply", str(p), "--model", "resnet18", "--fidelity", "smoke")
    assert_one_line_error(code, err, needle)


def test_show_unknown_study(capsys, tmp_path):
    code, _, err = run(capsys, "show", "nope", "--studies-dir", str(tmp_path))
    assert_one_line_error(code, err, "no study database")


def test_ablate_unknown_model(capsys):
    code, _, err = run(capsys, "ablate", "--model", "vgg20", "--structure-only")
    assert_one_line_error(code, err, "unknown model 'vgg20'")


def test_console_script_reports_one_line():
    """The installed entry point behaves like main()."""
    proc = subprocess.run([sys.executable, "-m", "recommender.cli", "--model", "alexnet", "--budget", "4MB"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown model 'alexnet'" in proc.stderr


def test_ablate_structure_json(capsys):
    code, out, _ = run(capsys, "ablate", "--model", "resnet101", "--num-classes", "10", "--structure-only",
                       "--format", "json", "--presets", "paper-resnet101-1,paper-resnet101-13")
    assert code == 0
    rows = json.loads(out)
    assert [r["preset"] for r in rows] == ["paper-resnet101-1", "paper-resnet101-13"]
    assert rows[0]["params"] == 42_512_970 and rows[0]["params_pct"] == 100.0
    assert {"preset", "params", "mflops", "size_mb"} <= set(rows[1])
    assert rows[1]["params"] < rows[0]["params"] / 100


def test_search_flags_reach_the_study_spec():
    """Every search flag maps onto its StudySpec field, and the spec accepts the value."""
    from recommender.cli import build_parser, run_options
    from recommender.constraints import MaxDrop
    from recommender.search.study import StudySpec

    args = build_parser().parse_args(["--model", "resnet18", "--max-drop", "2%", "--budget", "5M-params",
                                      "--sampler", "gp", "--structure-policy", "constraint"])
    opts = run_options(args)
    assert opts["sampler"] == "gp" and opts["structure_policy"] == "constraint"
    spec = StudySpec(model="resnet18", max_drop=MaxDrop.parse("2%"), budgets=["5M-params"], **opts)
    assert spec.structure_policy == "constraint"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "resnet18", "--structure-policy", "sometimes"])


@pytest.mark.parametrize("width", [80, 120])
def test_progress_lines_keep_the_counter_and_eta_at_narrow_widths(width):
    """A long recipe label must not push the step counter or the ETA off a progress line."""
    from rich.console import Console

    from recommender.cli import RunProgress

    console = Console(width=width, record=True, file=io.StringIO(), force_terminal=False, color_system=None)
    bar = RunProgress(console, total_trials=20)
    bar.started = True  # render the bars here, without a live display
    label = "ghost-bottleneck(2x) + se(0.25) + dws-stem + width 0.5 + unstructured-l1 59% + int8-static(x86)"
    bar.training(label, 37, 132, 1.234)
    bar.trials_task = bar.progress.add_task("trials", total=20, info="best #12 95.1% r0")
    bar.progress.update(bar.trials_task, completed=7)
    console.print(bar.progress.get_renderable())
    lines = [ln for ln in console.export_text().splitlines() if ln.strip()]
    assert len(lines) == 2, lines  # one line per bar: nothing wrapped
    assert "37/132" in lines[0] and "ETA" in lines[0] and "loss 1.234" in lines[0]
    assert "7/20" in lines[1] and "ETA" in lines[1] and "best #12 95.1% r0" in lines[1]
    assert all(len(ln) <= width for ln in lines)
    assert all(ln.rstrip().endswith(("-:--:--", "0:00:00")) or ln.rstrip()[-1].isdigit() for ln in lines), lines


@pytest.mark.parametrize("width", [80, 120])
def test_the_explanation_reads_at_narrow_widths(tmp_path, width):
    """At 80 and 120 columns no cell of the explanation breaks inside a word, and the panel's
    title is whole."""
    import re

    from tests.helpers import baseline, evaluation, synthetic_study

    from recommender.report import recommendation_from_study

    cands = {0: {0: evaluation(0.93, 50e3, 0.95, mflops=12.0, size_mb=0.2, latency_ms=1.5),
                 1: evaluation(0.945, 50e3, 0.955)},
             1: {0: evaluation(0.90, 20e3, 0.95, mflops=6.0, size_mb=0.1, latency_ms=1.1)}}
    rec = recommendation_from_study(synthetic_study(tmp_path, base=0.95, max_drop="2%", budgets=["1M-params"],
                                                    cands=cands, rungs={1: baseline(0.955)}))
    text = rec.explain(width=width)
    whole = set(re.findall(r"[A-Za-z]+", rec.explain(width=400)))  # every word, unbroken
    lines = text.splitlines()
    assert all(len(ln) <= width for ln in lines)
    assert any("Recommended: trial 0" in ln for ln in lines)
    broken = {w for w in re.findall(r"[A-Za-z]+", text) if w not in whole}
    assert not broken, broken  # a word cut across two lines leaves fragments that are no words


def test_the_fidelity_help_says_what_the_protocols_are():
    from recommender.cli import FIDELITY_HELP
    from recommender.protocol import describe_fidelity, list_fidelities

    assert list(FIDELITY_HELP) == [describe_fidelity(f) for f in list_fidelities()]


def test_the_command_lets_openmp_wait_passively(monkeypatch):
    """OpenMP spin-waiting collapsed training beside another busy process: the command asks for
    passive waiting before torch loads, unless the user set a policy of their own."""
    from recommender.cli import main

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["--version"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["--version"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
