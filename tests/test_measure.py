"""recommender.measure: counts, sizes, latency, memory."""

import torch

torch.set_num_threads(1)

import pytest  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import prune as tprune  # noqa: E402

from recommender import measure as M  # noqa: E402


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def test_params_and_flops_follow_fvcore_convention():
    m = small().train()
    assert M.count_params(m) == 3 * 8 * 9 + 16 + 8 * 10 + 10
    # conv MACs 32*32*8*27, BN 2*8*32*32, GAP 8*32*32, linear 80
    assert M.count_flops(m) == 32 * 32 * 8 * 27 + 2 * 8 * 1024 + 8 * 1024 + 80
    assert m.training, "count_flops must not change the mode"


def test_nonzero_with_masks_and_sparse_size():
    m = small()
    dense_sparse = M.sparse_size_mb(m)
    tprune.l1_unstructured(m[0], "weight", amount=0.5)
    assert M.count_nonzero_params(m) == M.count_params(m) - 108 - 8  # + BN biases start at 0
    assert M.count_flops(m) > 0  # works while masks are attached
    tprune.remove(m[0], "weight")
    assert M.sparse_size_mb(m) < dense_sparse
    assert M.size_mb(m) > M.sparse_size_mb(m)


def test_latency_restores_threads_and_measure_dict():
    m = small()
    before = torch.get_num_threads()
    ms = M.latency_ms(m, threads=2, repeats=3, warmup=1)
    assert ms > 0 and torch.get_num_threads() == before
    c = M.measure(m, repeats=3, warmup=1)
    d = c.to_dict()
    assert set(d) == {"params", "nonzero_params", "mflops", "size_mb", "sparse_size_mb", "latency_ms",
                      "peak_memory_mb", "latency_iqr_ms", "latency_cuda_ms", "latency_cuda_iqr_ms",
                      "latency_ort_ms", "latency_ort_iqr_ms", "latency_predicted_ms"}
    assert c.latency_iqr_ms is not None and c.latency_iqr_ms >= 0
    assert c.peak_memory_mb >= M.size_mb(m) * 0.9
    assert M.measure(m, latency=False).latency_ms is None


def test_peak_memory_grows_with_input():
    m = small()
    assert M.peak_memory_mb(m, (4, 3, 32, 32)) > M.peak_memory_mb(m, (1, 3, 32, 32))


def test_quantized_flops_come_from_float_model():
    from recommender.compress import apply_quantization
    from recommender.recipe import QuantConfig

    m = small().eval()
    q, _ = apply_quantization(m, QuantConfig("int8-static"), calibration=[torch.randn(4, 3, 32, 32)])
    assert M.is_quantized(q)
    assert M.count_flops(q) is None
    assert M.count_flops(q, float_model=m) == M.count_flops(m)
    assert M.count_params(q) > 0
    c = M.measure(q, float_model=m, repeats=2, warmup=1)
    assert c.mflops == pytest.approx(M.count_flops(m) / 1e6)


def test_latency_stats_median_iqr_and_noise_helper():
    m = small()
    s = M.latency_stats(m, threads=1, repeats=7, warmup=2)
    assert s.samples == 7 and s.number >= 1 and s.device == "cpu"
    assert s.q1_ms <= s.median_ms <= s.q3_ms and s.iqr_ms == pytest.approx(s.q3_ms - s.q1_ms)
    assert M.within_noise(s.median_ms, s.median_ms, s.iqr_ms)
    assert not M.within_noise(s.median_ms + s.iqr_ms + 1.0, s.median_ms, s.iqr_ms)
    assert not M.within_noise(5.0, None, None)
    c = M.measure(m, repeats=3, warmup=1, cuda_latency=False)
    assert c.latency_cuda_ms is None and c.latency_cuda_iqr_ms is None
    if not torch.cuda.is_available():
        assert M.measure(m, repeats=3, warmup=1).latency_cuda_ms is None
        with pytest.raises(RuntimeError):
            M.latency_stats(m, device="cuda")


def test_an_int8_model_is_timed_as_freshly_packed():
    """x86 int8 convs keep what their first call at a shape set up, thread count included (a
    first call on 2 threads made a model timed on 1 run 5-100x slower): latency_stats packs the
    weights again before its warm-up, leaving the outputs identical."""
    from recommender.compress import apply_quantization
    from recommender.recipe import QuantConfig

    x = torch.randn(2, 3, 32, 32)
    q, _ = apply_quantization(small().eval(), QuantConfig("int8-static", "x86", 2), calibration=[x])
    # the packed weights (a linear's sit one module down, in its LinearPackedParams)
    convs = [m for m in q.modules() if hasattr(m, "_packed_params") and not isinstance(m._packed_params, nn.Module)]
    assert convs
    before = [m._packed_params for m in convs]  # held, so that a new object cannot take an old id
    with torch.no_grad():
        ref = q(x)
        M.latency_stats(q, threads=1, repeats=2, warmup=1)
        assert torch.equal(q(x), ref)
    assert all(m._packed_params is not b for m, b in zip(convs, before))
