"""Hostile or careless input, round 3: recipe files that name code, passwords in malformed URLs,
terminal escapes in names, counts without a bound, files that are not what they claim, studies
changed by hand, silent wrong data. Each case: the exit code, one line on stderr, nothing written
outside the case's folder (tests/test_bad_inputs.py holds the earlier rounds).
"""

from __future__ import annotations

import errno
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from recommender.cli import main
from recommender.errors import DatasetError
from tests.test_bad_inputs import BASE, files_under, one_line_error, run

REPO = Path(__file__).resolve().parents[1]


# -- recipe files never import or call code ------------------------------------------------------

@pytest.mark.parametrize("model", ["os:getpid", "helper_xyz:build", "custom:SmallNet-0123abcd"])
def test_apply_never_imports_a_recipes_model(capsys, tmp_path, monkeypatch, model):
    marker = tmp_path / "ran"
    (tmp_path / "helper_xyz.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                            "def build():\n    return None\n")
    monkeypatch.chdir(tmp_path)  # the recipe's folder, first on sys.path before the fix
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": model, "model_source": "helper_xyz:build" if "helper" in model else None,
                                  "recipe": {}}))
    before = set(sys.modules)
    code, _, err = run(capsys, "apply", str(recipe), "--fidelity", "smoke", "--out", str(tmp_path / "o"))
    line = one_line_error(code, err, "never imports or runs code")
    assert "--model" in line
    assert not marker.exists() and "helper_xyz" not in set(sys.modules) - before
    assert not (tmp_path / "o").exists()


def test_factory_study_named_after_factory_and_recipe_names_it(tmp_path, monkeypatch):
    from recommender.constraints import MaxDrop
    from recommender.models import resolve_model
    from recommender.search.study import StudySpec

    monkeypatch.chdir(REPO)
    spec = StudySpec(model="tests.fixtures:make_net", max_drop=MaxDrop.parse("2%"), budgets=["5M-params"],
                     fidelity="smoke", studies_dir=str(tmp_path))
    resolve_model(spec.model, num_classes=10)  # the search resolves it; the spec keeps the factory's name
    assert spec.name.startswith("tests.fixtures-make_net-"), spec.name  # not customSmallNet-...


# -- secrets and terminal escapes ------------------------------------------------------------------

@pytest.mark.parametrize("url", ["postgresql:/alice:PASSWORD@127.0.0.1:1/db", "postgresql:alice:PASSWORD@h/db",
                                 "alice:PASSWORD@127.0.0.1"])
def test_password_in_malformed_url_is_hidden(capsys, tmp_path, url):
    code, out, err = run(capsys, *BASE, "--storage", url, "--studies-dir", str(tmp_path))
    one_line_error(code, err, "storage")
    assert "PASSWORD" not in err + out


def test_storage_error_shows_the_file_as_written():
    from recommender.search.storage import scrub

    assert scrub("cannot open sqlite:///studies/x.db: no such table") == \
        "cannot open sqlite:///studies/x.db: no such table"


def test_storage_error_names_the_cause_not_optunas_guess():
    import optuna

    from recommender.search.storage import error_text

    try:
        try:
            raise RuntimeError("attempt to write a readonly database")
        except RuntimeError as cause:
            raise optuna.exceptions.StorageInternalError(
                "An exception is raised during the commit. This typically happens due to invalid data in "
                "the commit, e.g. exceeding max length. ") from cause
    except optuna.exceptions.StorageInternalError as exc:
        assert error_text(exc) == "attempt to write a readonly database"


ESC = "\x1b[2J\x1b]0;pwned\x07evil"


@pytest.mark.parametrize("where", ["space", "class", "model"])
def test_terminal_escapes_in_names_are_escaped(capsys, tmp_path, where):
    from tests.helpers import make_folder

    if where == "space":
        argv = [*BASE, "--space", str(tmp_path / f"{ESC}.yaml"), "--studies-dir", str(tmp_path / "s")]
    elif where == "class":
        root = make_folder(tmp_path / "data", classes=2, per_class=4)
        (root / ESC).mkdir()  # a class without images
        argv = [*BASE, "--dataset", f"imagefolder:{root}", "--studies-dir", str(tmp_path / "s")]
    else:
        argv = [*BASE[:1], f"resnet18{ESC}", *BASE[2:], "--studies-dir", str(tmp_path / "s")]
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1, err
    assert "\x1b" not in err + out and "\x07" not in err + out


def test_printable_escapes_controls_and_keeps_lines():
    from recommender.printable import printable

    assert printable("a\x1b[2Jb\tc\nd\x9b") == "a\\x1b[2Jb\tc\nd\\x9b"


# -- bounds: every count a user or a file sets --------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["--rungs", "99999"], "--rungs must be an integer in [1, 5]"),
    (["--rungs", "50"], "--rungs must be an integer in [1, 5]"),
    (["--jobs", "1000000"], "--jobs must be an integer in [1, 64]"),
    (["--trials", "100000"], "--trials must be an integer in [1, 10000]"),
    (["--heartbeat", "99999999999999999999"], "--heartbeat must be an integer in [1, 3600]"),
    (["--grace", "0"], "--grace must be an integer"),
    (["--max-promoted", "1000"], "--max-promoted must be"),
    (["--image-size", "100000"], "--image-size must be"),
    (["--timeout", "9999999h"], "--timeout must be a number"),
    (["--trials", "1_0"], "expected a whole number"),
    (["--max-drop", "1_0"], "malformed max drop"),
    (["--seed", "1_0"], "expected a whole number"),
    (["--checkpoint", "x.pt", "--baseline-accuracy", "99"], "not both"),
])
def test_unbounded_counts_and_odd_numbers(capsys, tmp_path, argv, needle):
    code, _, err = run(capsys, *BASE, *argv, "--studies-dir", str(tmp_path / "s"))
    one_line_error(code, err, needle)
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("recipe,needle", [
    ({"prune": {"method": "unstructured-l1", "sparsity": 0.5, "finetune_steps": 10**9}}, "finetune_steps must be"),
    ({"quant": {"scheme": "int8-static", "calibration_batches": 10**9}}, "calibration_batches must be"),
    ({"arch": {"stem_width": 10**11}}, "stem_width must be an integer in [0, 16384]"),
    ({"arch": {"widths": [64, 128, 10**9, 512]}}, "widths must be"),
])
def test_recipe_counts_are_bounded(capsys, tmp_path, recipe, needle):
    p = tmp_path / "recipe.json"
    p.write_text(json.dumps({"model": "resnet18", "recipe": recipe}))
    code, _, err = run(capsys, "apply", str(p), "--fidelity", "smoke", "--out", str(tmp_path / "o"))
    one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_apply_epochs_bounded(capsys, tmp_path):
    p = tmp_path / "recipe.json"
    p.write_text(json.dumps({"model": "resnet18", "recipe": {}}))
    code, _, err = run(capsys, "apply", str(p), "--epochs", "10000000", "--out", str(tmp_path / "o"))
    one_line_error(code, err, "apply --epochs must be")


def test_ablate_classes_bounded(capsys):
    code, _, err = run(capsys, "ablate", "--model", "resnet18", "--structure-only", "--num-classes", "1")
    one_line_error(code, err, "--num-classes must be")


@pytest.mark.parametrize("body,needle", [
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n", "YAML nodes"),
    ("arch: &a {x: [*a]}\n", "YAML nodes"),
    ("arch: {stem_width: {value: 100000000000}}", "stem_width must be an integer in [0, 16384]"),
    ("prune:\n  method: {choices: [none, unstructured-l1]}\n  step: {low: 0.2, high: 0.5}\n", "a draw builds an invalid"),
    ("arch: {stem_width: {choices: [" + ", ".join(str(i + 1) for i in range(1001)) + "]}}", "choices: their number"),
])
def test_search_space_bombs_and_invalid_draws(capsys, tmp_path, body, needle):
    space = tmp_path / "space.yaml"
    space.write_text(body)
    code, _, err = run(capsys, *BASE, "--space", str(space), "--studies-dir", str(tmp_path / "s"))
    one_line_error(code, err, needle)
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("*.db"))


# -- files that are not what they claim ------------------------------------------------------------

def test_non_utf8_space_and_recipe(capsys, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_bytes(b"arch: {}\n# \xff\xfe\n")
    code, _, err = run(capsys, *BASE, "--space", str(space), "--studies-dir", str(tmp_path / "s"))
    one_line_error(code, err, "is not UTF-8 text")
    recipe = tmp_path / "recipe.json"
    recipe.write_bytes(b'{"model": "resnet18", "recipe": {}, "x": "\xff"}')
    code, _, err = run(capsys, "apply", str(recipe), "--fidelity", "smoke", "--out", str(tmp_path / "o"))
    one_line_error(code, err, "is not UTF-8 text")


def test_deeply_nested_recipe(capsys, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text("[" * 200_000 + "]" * 200_000)
    code, _, err = run(capsys, "apply", str(recipe), "--fidelity", "smoke", "--out", str(tmp_path / "o"))
    one_line_error(code, err, "nests deeper than 32 levels")


def _state(kind: str) -> dict:
    from tests.helpers import TinyCNN

    sd = TinyCNN(10).state_dict()
    if kind == "meta":
        return {k: v.to("meta") for k, v in sd.items()}
    if kind == "float8":
        return {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in sd.items()}
    return {k: v.to_sparse() if v.dim() == 2 else v for k, v in sd.items()}


@pytest.mark.parametrize("flag,kind,needle", [("--checkpoint", "meta", "on the meta device"),
                                              ("--checkpoint", "float8", "of dtype torch.float8"),
                                              ("--weights", "sparse", "is sparse")])
def test_checkpoint_tensors_that_are_not_weights(capsys, tmp_path, monkeypatch, flag, kind, needle):
    monkeypatch.chdir(REPO)
    path = tmp_path / f"{kind}.pt"
    torch.save(_state(kind), path)
    code, _, err = run(capsys, "--model", "tests.helpers:TinyCNN", *BASE[2:], flag, str(path),
                       "--studies-dir", str(tmp_path / "s"))
    one_line_error(code, err, needle)


def test_plain_pickle_checkpoint_is_one_line_without_warnings(capfd, tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(REPO)
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": np.zeros(3)}))
    code = main(["--model", "tests.helpers:TinyCNN", *BASE[2:], "--checkpoint", str(path),
                 "--studies-dir", str(tmp_path / "s")])
    out, err = capfd.readouterr()
    one_line_error(code, err, "is not a PyTorch weights file")
    assert "site-packages" not in err


def _huge_truncated_png(path: Path, side: int = 10_000) -> Path:
    """A PNG header announcing ``side`` x ``side`` pixels, cut inside its image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))[:40])
    return path


def test_truncated_huge_png_no_raw_warning(capfd, tmp_path):
    from tests.helpers import make_folder

    root = make_folder(tmp_path / "data", classes=2, per_class=4)
    _huge_truncated_png(root / "class0" / "huge.png")
    code = main([*BASE, "--dataset", f"imagefolder:{root}", "--studies-dir", str(tmp_path / "s")])
    out, err = capfd.readouterr()
    one_line_error(code, err, "huge.png")
    assert "Warning" not in err and "site-packages" not in err


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    from recommender.imagefolder import DecodeResized

    means = {}
    for name, value in (("dark", 40 * 257), ("bright", 65535)):
        Image.fromarray(np.full((16, 16), value, dtype=np.uint16)).save(tmp_path / f"{name}.png")
        means[name] = DecodeResized(8)(str(tmp_path / f"{name}.png")).float().mean().item()
    assert means == {"dark": 40.0, "bright": 255.0}


# -- studies changed by hand, full disks, closed pipes -----------------------------------------------

def _study(tmp_path: Path) -> str:
    from recommender.constraints import MaxDrop
    from recommender.search.study import StudySpec, open_study

    spec = StudySpec(model="resnet18", max_drop=MaxDrop.parse("2%"), budgets=["5M-params"], fidelity="smoke",
                     study_name="hand", studies_dir=str(tmp_path))
    open_study(spec)
    return spec.storage_url


@pytest.mark.parametrize("tamper", ["baseline", "evaluation"])
def test_show_of_a_tampered_study(capsys, tmp_path, tamper):
    import optuna

    url = _study(tmp_path)
    study = optuna.load_study(study_name="hand", storage=url)
    if tamper == "baseline":
        study.set_user_attr("baseline", "ninety percent")
    else:
        t = study.ask()
        t.set_user_attr("evaluation", [1, 2, 3])
        study.tell(t, [0.9, 1000.0])
    code, _, err = run(capsys, "show", "hand", "--studies-dir", str(tmp_path))
    one_line_error(code, err, "changed outside recommend")


def test_show_json_into_a_closed_pipe(tmp_path):
    _study(tmp_path)
    cmd = f"{sys.executable} -m recommender.cli show hand --studies-dir {tmp_path} --json | true"
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.stderr == "" and proc.returncode in (0, 141), proc.stderr


def test_full_disk_is_named(tmp_path):
    from recommender.errors import DiskFullError
    from recommender.io import atomic_write

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"disk full at {tmp_path}"):
        atomic_write(tmp_path / "weights.pt", full)
    assert files_under(tmp_path) == set()  # the temporary file is gone, nothing half-written


def test_full_disk_tmpfs(tmp_path):
    """A real full file system (a 1 MB tmpfs, where mounting is allowed): torch.save's error
    becomes "disk full at PATH"."""
    from recommender.errors import DiskFullError
    from recommender.io import atomic_write

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (mnt / "small.pt").write_bytes(b"kept")
        with pytest.raises(DiskFullError, match="disk full at"):
            atomic_write(mnt / "big.pt", lambda f: torch.save(torch.zeros(1_000_000), f))
        assert (mnt / "small.pt").read_bytes() == b"kept" and not (mnt / "big.pt").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# -- silent wrong data ---------------------------------------------------------------------------------

def test_cached_array_of_wrong_shape_or_tampered_is_discarded(tmp_path):
    from recommender.cache import WeightsCache

    cache = WeightsCache(tmp_path)
    key = "ab" * 32
    cache.save_array(key, "teacher_logits", np.zeros((20, 10), dtype=np.float32))
    assert cache.load_array(key, "teacher_logits", (20, 10)).shape == (20, 10)
    assert cache.load_array(key, "teacher_logits", (30, 10)) is None  # another data size: discarded
    assert not (cache.entry_dir(key) / "teacher_logits.npy").exists()
    cache.save_array(key, "teacher_logits", np.zeros((20, 10), dtype=np.float32))
    np.save(cache.entry_dir(key) / "teacher_logits.npy", np.zeros((5, 3), dtype=np.float32))  # replaced by hand
    assert cache.load_array(key, "teacher_logits") is None


def test_from_datasets_refuses_one_class_float_labels_and_strings():
    from torch.utils.data import Dataset, TensorDataset

    from recommender.streaming import from_datasets

    x = torch.rand(20, 3, 8, 8)
    good = TensorDataset(x, torch.tensor([0, 1] * 10))
    with pytest.raises(DatasetError, match="num_classes of a dataset pair must be"):
        from_datasets(good, good, 1, num_workers=0)
    floats = TensorDataset(x, torch.tensor([0.9, 1.7] * 10))
    with pytest.raises(DatasetError, match="whole numbers"):
        from_datasets(floats, floats, 2, num_workers=0)

    class Strings(Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return "an image", i % 2

    for workers in (0, 2):
        with pytest.raises(DatasetError) as err:
            from_datasets(Strings(), Strings(), 2, num_workers=workers)
        assert "\n" not in str(err.value) and "got str" in str(err.value)


def test_factory_calling_exit_says_so(capsys, tmp_path):
    code, _, err = run(capsys, "--model", "builtins:exit", *BASE[2:], "--studies-dir", str(tmp_path))
    one_line_error(code, err, "called exit")


def test_heartbeat_is_a_flag_not_the_environment(monkeypatch, tmp_path):
    from recommender.constraints import MaxDrop
    from recommender.search.study import StudySpec

    monkeypatch.setenv("RECOMMENDER_HEARTBEAT", "99999999999999999999")
    spec = StudySpec(model="resnet18", max_drop=MaxDrop.parse("2%"), budgets=["5M-params"], heartbeat=5, grace=15,
                     studies_dir=str(tmp_path))
    assert (spec.heartbeat, spec.grace) == (5, 15)


def test_derived_study_name_checked(capsys, tmp_path):
    code, _, err = run(capsys, "--model", "resnet18", "--budget", "9" * 300 + "-params", *BASE[4:],
                       "--studies-dir", str(tmp_path))
    one_line_error(code, err, "derived from the flags")
    assert files_under(tmp_path) == set()


def test_failed_apply_leaves_no_empty_folder(capsys, tmp_path):
    p = tmp_path / "recipe.json"
    p.write_text(json.dumps({"model": "resnet18", "recipe": {}}))
    code, _, err = run(capsys, "apply", str(p), "--dataset", "imagefolder:/nonexistent-folder", "--fidelity",
                       "smoke")
    assert code == 2, err
    assert not (tmp_path / "recipe-applied").exists()


# -- apply reproduces the recipe's data ------------------------------------------------------------

def _recipe_on(tmp_path: Path, root: Path, size: int) -> Path:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": "tests.fixtures:make_net", "model_source": "tests.fixtures:make_net",
                                  "dataset": f"imagefolder:{root}", "image_size": size, "num_classes": 3,
                                  "recipe": {}}))
    return recipe


def test_apply_uses_the_recipes_dataset_and_size(capsys, tmp_path, monkeypatch):
    from tests.helpers import make_folder

    monkeypatch.chdir(REPO)
    root = make_folder(tmp_path / "data", classes=3, per_class=8, size=(20, 20))
    recipe = _recipe_on(tmp_path, root, 12)
    code, out, err = run(capsys, "apply", str(recipe), "--model", "tests.fixtures:make_net", "--fidelity", "smoke",
                         "--format", "torchscript", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"),
                         "--quiet")
    assert code == 0, err
    ev = json.loads((tmp_path / "o" / "evaluation.json").read_text())
    assert ev["dataset"] == f"imagefolder:{root}" and ev["image_size"] == 12, ev
    # another dataset than the recorded one: used as asked, with a warning naming both
    code, out, err = run(capsys, "apply", str(recipe), "--model", "tests.fixtures:make_net", "--dataset", "digits",
                         "--fidelity", "smoke", "--format", "torchscript", "--out", str(tmp_path / "o2"),
                         "--cache-dir", str(tmp_path / "c"), "--quiet")
    assert code == 0, err
    assert "recommend: warning: the recipe was found on imagefolder:" in err and "applied to digits" in err


# -- show, ablate, locks --------------------------------------------------------------------------------

def test_show_takes_a_path_and_lists_studies(capsys, tmp_path):
    _study(tmp_path)
    (tmp_path / "hand").mkdir()
    for ref in (str(tmp_path / "hand"), str(tmp_path / "hand.db")):
        code, out, err = run(capsys, "show", ref, "--json")
        assert code == 0, err
        assert "study hand in sqlite:///" in err and json.loads(out)["study"]["name"] == "hand"
    code, out, err = run(capsys, "show", "--studies-dir", str(tmp_path))
    assert code == 0 and out.startswith("hand "), (out, err)


def test_ablate_skips_a_preset_the_model_cannot_build(capsys):
    code, out, err = run(capsys, "ablate", "--model", "resnet18", "--structure-only", "--quiet", "--presets",
                         "paper-resnet101-4,paper-resnet101-5,paper-resnet101-6")
    assert code == 0, err
    assert "paper-resnet101-6" in out and "paper-resnet101-5: skipped: does not apply" in out


def test_lock_files_are_removed_when_released(tmp_path):
    import multiprocessing as mp


    url = f"sqlite:///{tmp_path}/x.db"
    ctx = mp.get_context("spawn")
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [ctx.Process(target=_bump, args=(url, str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert int(counter.read_text()) == 3 * 20  # never two holders at once: no lost increment
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")] == []


def _bump(url: str, counter: str) -> None:
    from recommender.search.lock import study_lock

    for _ in range(20):
        with study_lock(url, "s", "w"):
            n = int(Path(counter).read_text())
            Path(counter).write_text(str(n + 1))
