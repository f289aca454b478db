"""`recommend apply`: a recipe file becomes a trained, compressed model and an artifact that runs
with torch alone."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from recommender.cli import main
from recommender.models.arch import ArchConfig
from recommender.recipe import PruneConfig, QuantConfig, Recipe

torch.set_num_threads(2)


def test_apply_exports_state_dict_and_torchscript(tmp_path, capsys):
    arch = ArchConfig(stem="dws", stem_width=16, block="ghost", widths=(16, 24, 40, 88),
                      inner=(32, 64, 128, 256), drop_last=True, head="nofc", width_multiplier=0.5)
    recipe = Recipe(arch, PruneConfig("unstructured-l1", 0.36), QuantConfig("int8-static", "x86", 2))
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"model": "resnet18", "num_classes": 10, "recipe": recipe.to_dict()}))
    out = tmp_path / "out"
    code = main(["apply", str(path), "--dataset", "digits", "--fidelity", "smoke", "--epochs", "6", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "model.ts" in printed

    state = torch.load(out / "state_dict.pt", weights_only=True)
    assert isinstance(state, dict) and state
    meta = json.loads((out / "evaluation.json").read_text())
    assert meta["evaluation"]["ok"] and meta["evaluation"]["accuracy"] > 0.2  # smoke beats chance (0.1)
    size = meta["input_size"]

    # The TorchScript artifact runs in a fresh interpreter that imports torch and nothing of ours.
    script = (f"import torch, sys; assert 'recommender' not in sys.modules; m = torch.jit.load({str(out / 'model.ts')!r}); "
              f"y = m(torch.randn({size[0]}, {size[1]}, {size[2]}, {size[3]})); print(tuple(y.shape))")
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(1, 10)"
