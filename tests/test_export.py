"""`recommend apply` exports: ONNX (onnxruntime agrees with PyTorch), torch.export (.pt2),
TorchScript; int8 recipes are TorchScript only and say why; a missing extra is one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recommender import export
from recommender.api import apply_recipe
from recommender.cli import main
from recommender.recipe import PruneConfig, QuantConfig, Recipe

torch.set_num_threads(2)

MODEL = "helpers:TinyCNN"  # tests/helpers.py, importable as the tests folder is on sys.path


def _recipe(tmp_path, prune: PruneConfig, quant: QuantConfig, name: str = "recipe.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"model": MODEL, "num_classes": 10, "recipe": Recipe(prune=prune, quant=quant).to_dict()}))
    return p


def test_pruned_fp32_recipe_exports_onnx_that_onnxruntime_agrees_with(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[export]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install -e '.[export]')")
    path = _recipe(tmp_path, PruneConfig("structured-channel", 0.5), QuantConfig("fp32"))
    steps = []
    res = apply_recipe(path, model=MODEL, dataset="digits", fidelity="smoke", out_dir=tmp_path / "out",
                       cache_dir=str(tmp_path / "cache"), formats=["onnx", "pt2", "torchscript"],
                       progress=lambda label, step, total, loss: steps.append((label, step, total, loss)))
    # training progress reached the caller, step by step, to the end
    assert steps and steps[-1][1] == steps[-1][2] and all(np.isfinite(s[3]) for s in steps)
    assert [e.format for e in res.exports] == ["onnx", "pt2", "torchscript"]
    assert all(e.ok and e.max_abs_diff is not None for e in res.exports), [e.describe() for e in res.exports]

    # the pruned model really is smaller, and the ONNX file runs it in onnxruntime
    assert res.evaluation.costs["params"] < 5000
    model = res.model.eval()
    sess = ort.InferenceSession(str(res.files["onnx"]), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    size = json.loads(res.files["evaluation"].read_text())["input_size"]
    for batch in (1, 4):  # the batch dimension is dynamic
        x = torch.randn(batch, *size[1:])
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {name: x.numpy()})[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)

    loaded = torch.export.load(str(res.files["pt2"])).module()
    x = torch.randn(3, *size[1:])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    meta = json.loads(res.files["evaluation"].read_text())
    assert {e["format"] for e in meta["exports"]} == {"onnx", "pt2", "torchscript"}


def test_int8_recipe_refuses_onnx_before_training(tmp_path, capsys):
    path = _recipe(tmp_path, PruneConfig(), QuantConfig("int8-static", "x86", 2))
    code = main(["apply", str(path), "--model", MODEL, "--fidelity", "smoke", "--format", "onnx", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "int8" in err and "TorchScript only" in err
    assert not (tmp_path / "c").exists(), "refused before any training"
    assert export.default_formats(int8=True) == ["torchscript"]


def test_missing_export_extra_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "onnx_available", lambda: False)
    path = _recipe(tmp_path, PruneConfig(), QuantConfig("fp32"))
    code = main(["apply", str(path), "--model", MODEL, "--fidelity", "smoke", "--format", "onnx,pt2", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and 'pip install "recommender[export]"' in err
    assert "onnx" not in export.default_formats(int8=False)  # the default works without the extra
    assert export.default_formats(int8=False) == ["pt2", "torchscript"]


def test_unknown_format_is_one_line(tmp_path, capsys):
    path = _recipe(tmp_path, PruneConfig(), QuantConfig("fp32"))
    assert main(["apply", str(path), "--format", "tflite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown export format 'tflite'" in err
