"""Careless or hostile input: each case is one `recommend: error: ...` line on stderr, never a
traceback or an "internal error", found before any expensive work, and never a password.

Study names that escape --studies-dir, impossible folders, out-of-range numbers, malformed search
spaces and recipes, invalid checkpoints, a diverging baseline, storage URLs with secrets, and a
study resumed with another baseline.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path

import pytest

from recommender.cli import main
from recommender.errors import RecommenderError
from recommender.search.storage import engine_url, redact, scrub, sqlite_path, sqlite_url

REPO = Path(__file__).resolve().parents[1]
BASE = ["--model", "resnet18", "--budget", "5M-params", "--fidelity", "smoke", "--trials", "1",
        "--no-warm-start", "--no-latency", "--confirm-fidelity", "none"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, needle, exit_code=2):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert lines[0].startswith("recommend: error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert code == exit_code, (code, err)
    return lines[0]


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- study names (item 2) ---------------------------------------------------------------------

BAD_NAMES = ["../../escaped", "/tmp/absolute-study", "a%2Fb", "a?mode=ro", "..", "a..b", "-x", ".hidden",
             "", "x" * 129, "sp ace", "a/b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_study_name_cannot_escape(capsys, tmp_path, name):
    studies = tmp_path / "a" / "b" / "studies"
    code, _, err = run(capsys, *BASE, f"--study-name={name}", "--studies-dir", str(studies))
    one_line_error(code, err, "invalid study name")
    assert files_under(tmp_path) == set(), "nothing may be written for a bad name"


@pytest.mark.parametrize("cmd", ["show", "dashboard"])
@pytest.mark.parametrize("name", ["../../escaped", "/etc/passwd", "a%2Fb", "a?x=1"])
def test_study_name_rule_in_show_and_dashboard(capsys, tmp_path, cmd, name):
    code, _, err = run(capsys, cmd, name, "--studies-dir", str(tmp_path))
    one_line_error(code, err, "invalid study name")


def test_valid_study_name_keeps_its_folder(tmp_path):
    from recommender.constraints import MaxDrop
    from recommender.search.study import StudySpec

    spec = StudySpec(model="resnet18", max_drop=MaxDrop.parse("2%"), budgets=["5M-params"],
                     study_name="my.study_v2-1", studies_dir=str(tmp_path / "odd?dir%2F"))
    assert sqlite_path(spec.storage_url) == tmp_path / "odd?dir%2F" / "my.study_v2-1.db"


# -- numbers and folders (items 5, 6) ---------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["--baseline-accuracy", "101"], "--baseline-accuracy must be a percentage in [0, 100]"),
    (["--baseline-accuracy", "-0.5"], "--baseline-accuracy must be a percentage"),
    (["--baseline-accuracy", "nan"], "--baseline-accuracy must be a percentage"),
    (["--baseline-accuracy", "inf"], "--baseline-accuracy must be a percentage"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2147483647]"),
    (["--seed", "4294967296"], "--seed must be an integer"),
])
def test_out_of_range_numbers(capsys, tmp_path, argv, needle):
    code, _, err = run(capsys, *BASE, *argv, "--studies-dir", str(tmp_path))
    one_line_error(code, err, needle)
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_dashboard_port_out_of_range(capsys, tmp_path, port):
    code, _, err = run(capsys, "dashboard", "--storage", sqlite_url(tmp_path / "x.db"), "--port", port)
    one_line_error(code, err, "--port must be an integer in [0, 65535]")


def test_apply_negative_seed(capsys, tmp_path):
    p = tmp_path / "recipe.json"
    p.write_text(json.dumps({"model": "resnet18", "recipe": {}}))
    code, _, err = run(capsys, "apply", str(p), "--seed", "-1", "--fidelity", "smoke", "--out", str(tmp_path / "o"))
    one_line_error(code, err, "--seed must be an integer")


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "plain-file"
    f.write_text("not a folder")
    return f


def _unwritable() -> Path:
    """A folder even root cannot create anything in (sysfs), or skip."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pass
    except OSError:
        return Path("/sys/recommender-test")
    pytest.skip("no read-only folder (/sys) to test an unwritable path with")


@pytest.mark.parametrize("where", ["studies-dir", "storage", "cache-dir"])
@pytest.mark.parametrize("kind", ["file on the way", "read-only"])
def test_impossible_or_unwritable_folders(capsys, tmp_path, a_file, where, kind):
    bad = a_file / "sub" if kind == "file on the way" else _unwritable()
    args = {"studies-dir": ["--studies-dir", str(bad)],
            "storage": ["--storage", sqlite_url(bad / "study.db"), "--studies-dir", str(tmp_path / "s")],
            "cache-dir": ["--cache-dir", str(bad), "--studies-dir", str(tmp_path / "s")]}[where]
    t0 = time.perf_counter()
    code, _, err = run(capsys, *BASE, *args)
    one_line_error(code, err, str(bad))
    assert not list(tmp_path.rglob("*.db")), "checked before a study is created"
    assert time.perf_counter() - t0 < 60  # before any training


def test_apply_unwritable_cache_dir_before_training(capsys, tmp_path, a_file):
    p = tmp_path / "recipe.json"
    p.write_text(json.dumps({"model": "resnet18", "recipe": {}}))
    code, _, err = run(capsys, "apply", str(p), "--cache-dir", str(a_file / "cache"), "--fidelity", "smoke",
                       "--out", str(tmp_path / "o"))
    one_line_error(code, err, "cache")


# -- search spaces and recipes (item 6) --------------------------------------------------------

@pytest.mark.parametrize("body,needle", [
    ("arch: {se: {choices: [false, true], when: [block]}}", "when must be a mapping"),
    ("arch: {se: {choices: [false, true], when: block}}", "when must be a mapping"),
    ("arch: {se: {choices: [false, true], when: {1: [x]}}}", "names a parent 1"),
    ("arch: {block: {choices: [standard]}, se: {choices: [false], when: {block: {a: 1}}}}", "got a mapping"),
    ("prune: {sparsity: {low: .nan, high: 0.5}}", "finite numeric low and high"),
    ("prune: {sparsity: {low: 0.1, high: 0.5, step: true}}", "step must be a positive number"),
    ("prune: {sparsity: {low: 0.1, high: 0.5, log: maybe}}", "log must be true or false"),
])
def test_malformed_search_space(capsys, tmp_path, body, needle):
    space = tmp_path / "space.yaml"
    space.write_text(body)
    code, _, err = run(capsys, *BASE, "--space", str(space), "--studies-dir", str(tmp_path / "s"))
    one_line_error(code, err, needle)


@pytest.mark.parametrize("recipe,needle", [
    ({"prune": {"method": "unstructured-l1", "sparsity": "a lot"}}, "sparsity must be a number"),
    ({"prune": {"method": "structured-channel", "sparsity": True}}, "sparsity must be a number"),
    ({"prune": {"method": "unstructured-l1", "finetune_steps": 1.5}}, "finetune_steps must be an integer"),
    ({"quant": {"scheme": "int8-static", "calibration_batches": 2.5}}, "calibration_batches must be an integer"),
    ({"quant": {"scheme": "int8-static", "engine": 3}}, "unknown quantization engine"),
    ({"quant": {"scheme": 8}}, "must be a method name"),
    ({"arch": {"groups": "four"}}, "groups must be a positive integer"),
    ({"arch": {"stem_width": 2.5}}, "stem_width must be a positive integer"),
    ({"prune": "heavy"}, "prune must be an object"),
])
def test_recipe_field_types(capsys, tmp_path, recipe, needle):
    p = tmp_path / "recipe.json"
    p.write_text(json.dumps({"model": "resnet18", "recipe": recipe}))
    code, _, err = run(capsys, "apply", str(p), "--fidelity", "smoke", "--out", str(tmp_path / "o"))
    line = one_line_error(code, err, needle)
    assert "invalid recipe" in line


# -- checkpoints, the baseline and the study identity (item 5) ---------------------------------

def _tiny_checkpoint(path: Path, nan: bool = False, scale: float = 1.0) -> Path:
    import torch

    from recommender.compress.checkpoint import save_state
    from tests.helpers import TinyCNN

    torch.manual_seed(0)
    sd = TinyCNN(10).state_dict()
    sd["fc.weight"].mul_(scale)
    if nan:
        sd["fc.weight"][0, 0] = math.nan
    return save_state(path, sd)


def test_nan_checkpoint_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    ckpt = _tiny_checkpoint(tmp_path / "nan.pt", nan=True)
    code, _, err = run(capsys, "--model", "tests.helpers:TinyCNN", *BASE[2:], "--checkpoint", str(ckpt),
                       "--studies-dir", str(tmp_path / "s"))
    one_line_error(code, err, "non-finite (NaN/inf)")
    assert not list(tmp_path.rglob("*.db")), "refused before a study is created"


def test_diverging_baseline_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    code, _, err = run(capsys, "--model", "tests.helpers:DivergingCNN", *BASE[2:], "--quiet",
                       "--studies-dir", str(tmp_path / "s"))
    line = one_line_error(code, err, "could not be trained at smoke fidelity: diverged", exit_code=1)
    assert "non-finite loss" in line


@pytest.mark.parametrize("change", ["checkpoint", "baseline-accuracy"])
def test_resumed_study_with_another_baseline_is_refused(capsys, tmp_path, monkeypatch, change):
    """--checkpoint (by content) and --baseline-accuracy are part of the study's identity."""
    from recommender.constraints import MaxDrop
    from recommender.models import resolve_model
    from recommender.search.study import StudySpec, open_study

    monkeypatch.chdir(REPO)
    first = _tiny_checkpoint(tmp_path / "a.pt")
    model = resolve_model("tests.helpers:TinyCNN", num_classes=10, seed=0)  # as the run resolves it
    common = dict(model=model, max_drop=MaxDrop.parse("2%"), budgets=["5M-params"],
                  fidelity="smoke", study_name="resume-me", studies_dir=str(tmp_path / "s"), checkpoint=str(first))
    if change == "checkpoint":
        open_study(StudySpec(**common))  # the existing study (no training needed to create it)
        other = _tiny_checkpoint(tmp_path / "b.pt", scale=2.0)
        extra = ["--checkpoint", str(other)]
    else:  # a checkpoint and a stated accuracy are refused together: the study had neither
        open_study(StudySpec(**{**common, "checkpoint": None}))
        extra = ["--baseline-accuracy", "93.5"]
    code, _, err = run(capsys, "--model", "tests.helpers:TinyCNN", *BASE[2:], "--max-drop", "2%", *extra,
                       "--study-name", "resume-me", "--studies-dir", str(tmp_path / "s"))
    line = one_line_error(code, err, "already exists")
    assert change.replace("-", "_") in line
    if change == "checkpoint":  # the same file under another name is the same baseline: accepted
        same = tmp_path / "copy.pt"
        same.write_bytes(first.read_bytes())
        open_study(StudySpec(**{**common, "checkpoint": str(same)}))


# -- secrets (item 7) ---------------------------------------------------------------------------

@pytest.mark.parametrize("url,secret", [
    ("postgresql://:hunter2pw@127.0.0.1:1/db", "hunter2pw"),
    ("postgresql://u@127.0.0.1:1/db?password=hunter2pw&sslmode=disable", "hunter2pw"),
    ("postgresql://u:hunter2@pw@127.0.0.1:1/db", "hunter2"),
    ("postgresql://u:hunter2pw@127.0.0.1:notaport/db", "hunter2pw"),
    ("postgresql+psycopg2://u:hunter2pw@127.0.0.1:1/db?sslpassword=alsosecret", "alsosecret"),
])
def test_redaction(url, secret):
    shown = redact(url)
    assert secret not in shown and "***" in shown, shown
    assert secret not in scrub(f"could not connect to {url}: refused", url)


@pytest.mark.parametrize("url,secret", [
    ("postgresql://:hunter2pw@127.0.0.1:1/db", "hunter2pw"),
    ("postgresql://u@127.0.0.1:1/db?password=hunter2pw", "hunter2pw"),
    ("postgresql://u:hunter2@pw@127.0.0.1:1/db", "hunter2"),
    ("postgresql://u:hunter2pw@127.0.0.1:notaport/db", "hunter2pw"),
    ("nosuchdialect://u:hunter2pw@host/db", "hunter2pw"),
])
@pytest.mark.parametrize("cmd", ["run", "show", "dashboard"])
def test_no_secret_in_errors(capsys, tmp_path, url, secret, cmd):
    argv = {"run": [*BASE, "--storage", url, "--studies-dir", str(tmp_path)],
            "show": ["show", "some-study", "--storage", url],
            "dashboard": ["dashboard", "--storage", url, "--port", "0"]}[cmd]
    code, out, err = run(capsys, *argv)
    one_line_error(code, err, "storage")
    assert secret not in err + out


def test_documented_postgres_url_gets_the_installed_driver():
    url = engine_url("postgresql://u:p%40ss@db-host:5432/recommender?sslmode=require")
    assert url.startswith(("postgresql+psycopg2://", "postgresql+psycopg://")), url
    assert url.endswith("u:p%40ss@db-host:5432/recommender?sslmode=require")
    assert engine_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"  # explicit: kept
    assert engine_url("sqlite:///x.db") == "sqlite:///x.db"


# -- show reads only (item 8) -------------------------------------------------------------------

def test_show_creates_no_tables(capsys, tmp_path):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE mine (x INTEGER)")
    before = db.read_bytes()
    code, _, err = run(capsys, "show", "other", "--studies-dir", str(tmp_path))
    one_line_error(code, err, "holds no Optuna studies")
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert tables == ["mine"] and db.read_bytes() == before


def test_validation_errors_are_recommender_errors():
    from recommender import validate

    for fn, arg in [(validate.study_name, "../x"), (validate.seed, -1), (validate.port, 70000),
                    (validate.percent, math.nan)]:
        with pytest.raises(RecommenderError):
            fn(arg) if fn is not validate.percent else fn(arg, "--x")
