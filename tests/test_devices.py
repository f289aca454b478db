"""Devices and threads: resolution, protocol fields, CLI options, CUDA latency budgets."""

from __future__ import annotations

import os

import pytest
import torch

from recommender.cli import main
from recommender.constraints import Budget
from recommender.devices import Execution, available_cpus, resolve_device
from recommender.errors import RecommenderError
from recommender.protocol import get_protocol

NO_GPU = not torch.cuda.is_available()


def test_threads_follow_omp_then_affinity(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert available_cpus() == 3
    assert get_protocol("proxy").resolved_threads() == 3
    assert get_protocol("proxy", threads=1).resolved_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cpus() == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a number: ignored
    assert available_cpus() == expected


def test_device_resolution_and_protocol_fields():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cpu" if NO_GPU else "cuda")
    with pytest.raises(RecommenderError):
        resolve_device("tpu")
    with pytest.raises(RecommenderError):
        get_protocol("proxy", device="gpu")
    with pytest.raises(RecommenderError):
        get_protocol("proxy", precision="fp8")
    p = get_protocol("proxy")
    assert p.device == "auto"
    # execution details are not part of the cache key
    assert p.replace(device="cpu", precision="bf16", channels_last="on", compile=True).key() == p.key()
    ex = Execution.resolve("cpu", "auto", "auto")
    assert ex.amp_dtype is None and not ex.channels_last and not ex.needs_scaler


def test_auto_execution_on_cuda_depends_on_the_input_size(monkeypatch):
    """On a GPU, ``auto`` is float32/contiguous for inputs of at most 32 px (launch-bound: autocast
    and channels_last were slower there) and bf16 (fp16 without bf16) + channels_last above."""
    import recommender.devices as D

    monkeypatch.setattr(D, "cuda_available", lambda: True)
    for bf16, amp in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, _v=bf16, **k: _v)
        for px in (8, 16, D.SMALL_INPUT_PX):
            ex = Execution.resolve("cuda", "auto", "auto", max_input_px=px)
            assert ex.device == "cuda" and ex.amp_dtype is None and not ex.channels_last
        for px in (D.SMALL_INPUT_PX + 1, 224, None):
            ex = Execution.resolve("auto", "auto", "auto", max_input_px=px)
            assert ex.amp_dtype == amp and ex.channels_last and ex.needs_scaler == (amp == torch.float16)
    # explicit choices win at any size
    ex = Execution.resolve("cuda", "bf16", "on", max_input_px=8)
    assert ex.amp_dtype == torch.bfloat16 and ex.channels_last
    assert get_protocol("paper").execution().amp_dtype is None  # 32 px
    assert get_protocol("proxy", max_resolution=0).execution().amp_dtype is not None  # native size


@pytest.mark.skipif(not NO_GPU, reason="checks the error on a machine without a CUDA GPU")
def test_cuda_without_gpu_is_one_line(capsys, tmp_path):
    with pytest.raises(RecommenderError) as err:
        resolve_device("cuda")
    assert "no CUDA GPU" in str(err.value)
    code = main(["--model", "resnet18", "--budget", "5M-params", "--device", "cuda",
                 "--studies-dir", str(tmp_path)])
    err_lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(err_lines) == 1 and "no CUDA GPU" in err_lines[0]
    code = main(["--model", "resnet18", "--budget", "3ms-cuda", "--studies-dir", str(tmp_path)])
    err_lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(err_lines) == 1 and "CUDA latency" in err_lines[0]
    assert not list(tmp_path.glob("*.db"))


def test_cli_execution_options_reach_the_study_spec(monkeypatch, tmp_path):
    import recommender.api as api

    seen = {}

    def fake_recommend(model=None, *, spec=None, **kw):
        seen["spec"] = spec  # the CLI parses the flags once, into the spec it passes
        raise RecommenderError("stop here")

    monkeypatch.setattr(api, "recommend", fake_recommend)
    code = main(["--model", "resnet18", "--budget", "5M-params", "--device", "cpu", "--threads", "1",
                 "--image-size", "24", "--studies-dir", str(tmp_path)])
    assert code == 2
    spec = seen["spec"]
    assert (spec.device, spec.threads, spec.image_size) == ("cpu", 1, 24)
    assert main(["--model", "resnet18", "--budget", "5M-params", "--threads", "-1",
                 "--studies-dir", str(tmp_path)]) == 2


def test_study_spec_builds_the_protocol_with_device_and_threads(tmp_path):
    from recommender.search.study import Search, StudySpec

    spec = StudySpec(model="resnet18", max_drop="2%", budgets=["5M-params"], fidelity="smoke",
                     device="cpu", threads=1, studies_dir=str(tmp_path))
    s = Search(spec)
    assert s.protocol.device == "cpu" and s.protocol.threads == 1
    assert "image_size" not in spec.identity()  # old studies resume unchanged


def test_cuda_latency_budget_grammar_and_noise():
    b = Budget.parse("12ms-cuda")
    assert (b.metric, b.limit, b.cost_field, b.device) == ("latency-cuda", 12.0, "latency_cuda_ms", "cuda")
    assert Budget.parse("12ms-cpu").metric == "latency" and Budget.parse("12ms").device == "cpu"
    assert Budget.parse("5M-params").device is None
    costs = {"latency_ms": 11.0, "latency_iqr_ms": 1.5, "latency_cuda_ms": 3.0, "latency_cuda_iqr_ms": 0.1}
    assert Budget.parse("12ms").within_noise(costs)          # 12 in [9.5, 12.5]
    assert not Budget.parse("13ms").within_noise(costs)
    assert not b.within_noise(costs)                          # 12 far from 3 +- 0.1
    assert not Budget.parse("5M-params").within_noise({"params": 5e6})
    assert not Budget.parse("12ms").within_noise({"latency_ms": 12.0})  # no IQR measured
    assert b.violation({"latency_cuda_ms": None}) == float("inf")


@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_cuda_latency_is_measured_on_the_gpu():
    from recommender import measure as M

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.LazyLinear(10))
    m(torch.zeros(1, 3, 32, 32))
    s = M.latency_stats(m, device="cuda", repeats=5, warmup=2)
    assert s.device == "cuda" and s.median_ms > 0 and s.iqr_ms >= 0
    assert next(m.parameters()).device.type == "cpu"  # a copy ran there
    c = M.measure(m, repeats=3, warmup=1)
    assert c.latency_cuda_ms is not None and c.latency_cuda_iqr_ms is not None
