"""Device latency profiles: the format (round trip, version), the one-line errors, the budget
grammar with ``@`` and ``-ort``, and predictions on a tiny model against a hand-made profile
(deterministic: no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from recommender import latency_ops
from recommender.cli import main
from recommender.constraints import Budget, parse_budgets
from recommender.errors import ConstraintSyntaxError, ProfileError
from recommender.latency_predict import predict_latency, predict_records
from recommender.latency_profile import load_profile, profile_from_dict
from recommender.measure import measure


def tiny(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 2)).eval()


SIZE = (1, 3, 8, 8)


def hand_profile(models=(tiny(4), tiny(8)), *, ms=None, scales=None, overhead=0.5, drop_kind=None,
                 version=latency_ops.FORMAT_VERSION, error=5.0) -> dict:
    """A profile whose every operator takes a chosen time: 1 ms per conv per 4 output channels,
    0.1 ms for anything else (module calls included)."""
    entries, seen = [], set()
    for m in models:
        for rec in latency_ops.trace(m, SIZE):
            key = latency_ops.spec_key(rec)
            if key in seen or latency_ops.kind_of(rec) == drop_kind:
                continue
            seen.add(key)
            t = ms(rec) if ms else (rec["args"][1]["t"][0] / 4 if rec["op"] == "aten.conv2d.default" else 0.1)
            entries.append({"spec": latency_ops.canonical(rec), "engine": None, "ms": t, "iqr_ms": 0.0})
    return {"format": latency_ops.FORMAT, "version": version, "threads": 1,
            "device": {"machine": "testboard", "torch": torch.__version__}, "engines": ["x86"],
            "entries": entries,
            "calibration": {"scales": scales or {"float": 2.0, "call": 1.0}, "overhead_ms": overhead},
            "validation": {"models": [], "median_error_pct": error / 2, "p90_error_pct": error}}


def write(tmp_path: Path, d: dict, name: str = "board.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


# -- the format --------------------------------------------------------------------------------

def test_profile_round_trip(tmp_path):
    d = hand_profile()
    prof = load_profile(write(tmp_path, d))
    assert prof.table and prof.kinds >= {"aten.conv2d", "aten.relu", "aten.linear", "module.call"}
    assert prof.error_pct == 5.0 and prof.threads == 1 and len(prof.digest) == 12
    again = load_profile(write(tmp_path, json.loads(json.dumps(prof.data)), "copy.json"))
    assert again.table == prof.table and again.digest == prof.digest
    assert "testboard" in prof.describe() and "5.0 %" in prof.describe()


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    (json.dumps({"hello": 1}), "not a recommender latency profile"),
    (json.dumps(hand_profile(version=latency_ops.FORMAT_VERSION + 1)), "format version"),
    (json.dumps({**hand_profile(), "entries": []}), "no timed operators"),
    (json.dumps({**hand_profile(), "entries": [{"spec": {"op": "aten.relu.default"}, "ms": "fast"}]}),
     "entry 0"),
    (json.dumps({**hand_profile(), "calibration": None}), "no calibration"),
])
def test_bad_profile_is_one_clear_error(tmp_path, content, needle):
    p = tmp_path / "board.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ProfileError, match=needle):
        load_profile(p)
    with pytest.raises(ProfileError, match=needle):
        Budget.parse(f"12ms@{p}")


@pytest.mark.parametrize("content, needle", [(None, "no such file"), ("{", "not JSON"),
                                             ("v2", "format version")])
def test_bad_profile_on_the_command_line_exits_2(tmp_path, capsys, content, needle):
    p = tmp_path / "board.json"
    if content == "v2":
        content = json.dumps(hand_profile(version=99))
    if content is not None:
        p.write_text(content)
    code = main(["--model", "resnet18", "--budget", f"12ms@{p}", "--fidelity", "smoke", "--trials", "1",
                 "--studies-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


# -- the budget grammar ------------------------------------------------------------------------

def test_budget_at_profile(tmp_path):
    p = write(tmp_path, hand_profile())
    b = Budget.parse(f"12ms@{p}")
    assert b.metric == "latency-profile" and b.limit == 12.0 and b.predicted
    assert b.profile == str(p.resolve()) and b.profile_digest == load_profile(p).digest
    assert b.cost_field == "latency_predicted_ms" and b.device is None
    text = b.describe()
    assert "predicted" in text and "board.json" in text and "5.0 %" in text
    assert b.source == "predicted (profile board.json, validation error 5.0 %)"
    assert Budget(**b.to_dict()) == b  # stored in the study, read back by the report
    # within the profile's error: 12 ms against a prediction of 11.5 ms +- 5 % is uncertain
    assert b.within_noise({"latency_predicted_ms": 11.5}) and not b.within_noise({"latency_predicted_ms": 10.0})
    assert b.violation({"latency_predicted_ms": None}) == math.inf  # unknown: never within budget
    # repeatable with other budgets, once per metric
    assert [x.metric for x in parse_budgets(["5M-params", f"12ms@{p}", "20ms"])] == \
        ["params", "latency-profile", "latency"]


def test_budget_ort_and_malformed_forms(tmp_path):
    b = Budget.parse("12ms-ort")
    assert b.metric == "latency-ort" and b.cost_field == "latency_ort_ms" and not b.predicted
    assert "ONNX Runtime" in b.describe() and b.source == "measured in ONNX Runtime"
    assert b.within_noise({"latency_ort_ms": 11.9, "latency_ort_iqr_ms": 0.2})
    assert b.violation({"latency_ort_ms": None}) == math.inf
    for bad in ("12ms@", "12ms-cuda@board.json", "12ms-ort@board.json", "ms@board.json"):
        with pytest.raises(ConstraintSyntaxError, match="12ms@board.json"):
            Budget.parse(bad)
    with pytest.raises(ConstraintSyntaxError):
        Budget("latency-profile", 12.0)  # a predicted budget without its profile
    # budgets without a profile are stored as before (resumed studies keep their identity)
    assert Budget.parse("5M-params").to_dict() == {"metric": "params", "limit": 5e6, "text": "5M-params"}


# -- prediction --------------------------------------------------------------------------------

def test_prediction_is_the_calibrated_sum(tmp_path):
    prof = load_profile(write(tmp_path, hand_profile()))
    records = latency_ops.trace(tiny(4), SIZE)
    calls = sum(r["op"] == latency_ops.MODULE_CALL for r in records)
    ops = len(records) - calls
    pred = predict_latency(tiny(4), prof, SIZE)
    # conv of 4 channels: 1 ms; every other operator 0.1 ms; float x2, calls x1, + 0.5 ms
    assert pred.exact == len(records) and pred.interpolated == 0
    assert pred.raw_ms == pytest.approx(1.0 + 0.1 * (ops - 1) + 0.1 * calls)
    assert pred.ms == pytest.approx(2.0 * (1.0 + 0.1 * (ops - 1)) + 0.1 * calls + 0.5)
    assert predict_records(records, prof).ms == pytest.approx(pred.ms)


def test_prediction_interpolates_channels(tmp_path):
    prof = load_profile(write(tmp_path, hand_profile(scales={"float": 1.0, "call": 1.0}, overhead=0.0)))
    from recommender.latency_predict import _index

    p4, p8, p6 = (predict_latency(tiny(w), prof, SIZE) for w in (4, 8, 6))
    assert p6.interpolated >= 1 and p6.exact < p6.operators and p4.ms < p6.ms < p8.ms
    conv = next(r for r in latency_ops.trace(tiny(6), SIZE) if r["op"] == "aten.conv2d.default")
    t, how = latency_ops.lookup(_index(prof), conv, latency_ops.kind_of(conv))
    # 1 ms at 4 channels, 2 ms at 8, the same ms per multiply-accumulate: linear between them
    assert how == "interpolated" and t == pytest.approx(1.5)
    # above the timed range: in proportion to the work; below it: the smallest's time
    from recommender.latency_ops import _interpolate

    pts = [(10.0, 1.0, ()), (20.0, 2.0, ())]
    assert _interpolate(pts, 40.0) == pytest.approx(4.0)  # on their line
    assert _interpolate(pts, 5.0) == pytest.approx(0.5)
    # a small operator's time is mostly fixed cost: a large one is not its multiple
    fixed = [(100.0, 0.06, ()), (200.0, 0.06, ()), (400.0, 0.07, ()), (800.0, 0.08, ())]
    assert 0.08 < _interpolate(fixed, 80000.0) < 3.0
    # an outlier among the nearest points does not carry the estimate (median of 3)
    odd = [(10.0, 1.0, ()), (20.0, 2.0, ()), (30.0, 60.0, ()), (1000.0, 100.0, ())]
    assert _interpolate(odd, 25.0) < 5.0
    assert predict_latency(tiny(16), prof, SIZE).ms > 1.5 * p8.ms


def test_missing_kind_is_refused_naming_it(tmp_path):
    prof = load_profile(write(tmp_path, hand_profile(drop_kind="aten.relu")))
    with pytest.raises(ProfileError, match=r"no timing of aten\.relu\b"):
        predict_latency(tiny(4), prof, SIZE)
    # also through measure(): the evaluator's path (no fallback to a measured latency)
    with pytest.raises(ProfileError, match="aten.relu"):
        measure(tiny(4), SIZE, latency=False, profile=prof)


def test_measure_fills_the_predicted_field_only(tmp_path):
    prof = load_profile(write(tmp_path, hand_profile()))
    c = measure(tiny(4), SIZE, latency=False, profile=prof)
    assert c.latency_predicted_ms == pytest.approx(predict_latency(tiny(4), prof, SIZE).ms)
    assert c.latency_ms is None and c.latency_ort_ms is None


def test_trace_changes_no_global_state():
    from recommender.compress.quantize import Int8StaticConfig, apply_quantization

    q, _ = apply_quantization(tiny(4), Int8StaticConfig(engine="qnnpack", observer="minmax"),
                              calibration=[torch.randn(2, 3, 8, 8)], example_input=torch.randn(SIZE))
    before = torch.backends.quantized.engine
    recs = latency_ops.trace(q, SIZE)
    assert torch.backends.quantized.engine == before
    kinds = {latency_ops.kind_of(r) for r in recs}
    assert "quantized.conv2d_relu@qnnpack" in kinds and q.training is False


def test_fit_calibration_recovers_scales():
    rows = [({"float": f, "call": c}, 1.5 * f + 1.0 * c + 0.3) for f, c in [(1, 1), (4, 2), (10, 1), (2, 5)]]
    cal = latency_ops.fit_calibration(rows, ridge=1e-6)
    assert cal["scales"]["float"] == pytest.approx(1.5, rel=1e-3)
    assert cal["overhead_ms"] == pytest.approx(0.3, abs=1e-3)


# -- the standalone script ---------------------------------------------------------------------

def test_written_script_needs_only_torch(tmp_path, monkeypatch):
    from recommender import latency_profile, profile_plan
    from recommender.profile_plan import PlanModel

    monkeypatch.setattr(profile_plan, "PLAN_MODELS", lambda: [
        PlanModel("resnet18", {"width_multiplier": 0.25}, role="calibrate"),
        PlanModel("resnet18", {"width_multiplier": 0.25}, sparsity=0.5, role="validate")])
    script = latency_profile.write_script(tmp_path / "profile_device.py", input_sizes=(8,))
    out = tmp_path / "board.json"
    code = ("import runpy, sys\n"
            f"sys.argv = ['profile_device.py', '--out', {str(out)!r}]\n"
            "try:\n"
            f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "assert not [m for m in sys.modules if m.startswith('recommender')], 'imported recommender'\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    prof = load_profile(out)
    assert prof.data["validation"]["models"] and prof.error_pct is not None
    assert "aten.conv2d" in prof.kinds and prof.calibration["models"] == ["resnet18[width_multiplier=0.25] @8px"]
    # a model made of the plan's operators is predicted from it without a missing kind
    from recommender.profile_plan import build_plan_model

    net = build_plan_model(PlanModel("resnet18", {"width_multiplier": 0.25}), input_size=8)
    assert predict_latency(net, prof, (1, 3, 8, 8)).ms > 0
    assert profile_from_dict(prof.data).table == prof.table


# -- ONNX Runtime ------------------------------------------------------------------------------

def test_ort_says_which_recipes_it_cannot_time():
    from recommender.compress.quantize import Int8StaticConfig, apply_quantization
    from recommender.export import onnx_available
    from recommender.ort_latency import ort_latency_stats, ort_unsupported

    if not onnx_available():
        pytest.skip("the export extra (onnxruntime) is not installed")
    q, _ = apply_quantization(tiny(4), Int8StaticConfig(observer="minmax"),
                              calibration=[torch.randn(2, 3, 8, 8)], example_input=torch.randn(SIZE))
    assert "int8" in ort_unsupported(q) and ort_latency_stats(q, SIZE) is None
    c = measure(q, SIZE, latency=False, ort_latency=True)
    assert c.latency_ort_ms is None and Budget.parse("12ms-ort").violation(c) == math.inf
    assert ort_unsupported(tiny(4)) is None
    s = ort_latency_stats(tiny(4), SIZE, repeats=3, warmup=1)
    assert s is not None and s.median_ms > 0 and s.device == "cpu/onnxruntime"


def test_space_the_profile_cannot_predict_is_refused_before_training(tmp_path, capsys):
    from recommender.latency_predict import check_space
    from recommender.search.space import SearchSpace

    prof = load_profile(write(tmp_path, hand_profile()))  # float32 only
    with pytest.raises(ProfileError, match="no int8 timings on the x86 engine"):
        check_space(prof, SearchSpace.for_model("resnet18"))
    fp32_only = SearchSpace.from_dict({"family": "cifar-resnet", "quant": {"scheme": {"value": "fp32"}}})
    check_space(prof, fp32_only)
    code = main(["--model", "resnet18", "--budget", f"12ms@{tmp_path / 'board.json'}", "--fidelity", "smoke",
                 "--trials", "1", "--studies-dir", str(tmp_path / "s"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "no int8 timings on the x86 engine" in err and len(err.strip().splitlines()) == 1, err
    assert not list((tmp_path / "s").glob("cache/**/*.pt"))  # nothing was trained


@pytest.mark.parametrize("argv, needle", [
    (["--out", "{file}/board.json"], "the folder of"),
    (["--write-script", "{file}/p.py"], "the folder of"),
    (["--out", "{tmp}/b.json", "--models", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["--out", "{tmp}/b.json", "--image-size", "0"], "--image-size"),
    (["--out", "{tmp}/b.json", "--threads", "0"], "--threads"),
])
def test_device_profile_bad_input_before_any_work(tmp_path, capsys, argv, needle):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    argv = [a.format(file=a_file, tmp=tmp_path) for a in argv]
    code = main(["device-profile", *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
