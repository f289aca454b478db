"""The package ships its search spaces and presets: a wheel built from the checkout runs on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here (no build backend from the package index?): "
                    f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return next(out.glob("recommender-*.whl"))


def test_wheel_contains_spaces_and_presets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("resnet.yaml", "vgg.yaml", "torchvision.yaml", "generic.yaml", "trained.yaml",
              "presets/resnet101.yaml", "presets/vgg19.yaml"):
        assert f"recommender/search_spaces/{f}" in names, names


def test_wheel_runs_ablate_like_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import json, recommender; from recommender.ablate import ablate; "
            "rows = ablate('resnet101', 10, structure_only=True, presets=['paper-resnet101-1', 'paper-resnet101-13']); "
            "print(json.dumps({'file': recommender.__file__, 'rows': [[r.params, round(r.mflops, 2)] for r in rows]}))")
    # the extracted wheel comes first on the path, ahead of the editable install of the checkout
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(site))
    from recommender.ablate import ablate

    mine = ablate("resnet101", 10, structure_only=True, presets=["paper-resnet101-1", "paper-resnet101-13"])
    assert out["rows"] == [[r.params, round(r.mflops, 2)] for r in mine]
    assert out["rows"][0] == [42_512_970, 2520.22]
