"""Bad input: one clear line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

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
