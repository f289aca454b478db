"""int8 options: per-layer sensitivity, keep_float (mixed precision), observers, per-channel
weights, quantization-aware fine-tuning; their configs keep old recipe dicts at the defaults."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recommender.compress import apply_quantization
from recommender.compress.methods import make_config
from recommender.compress.quant_sensitivity import (cached_quant_sensitivity, measure_quant_sensitivity,
                                                    quantizable_layers, weight_quant_error)
from recommender.compress.quantize import Int8StaticConfig, PercentileObserver, int8_qconfig_mapping
from recommender.errors import RecommenderError
from recommender.recipe import QuantConfig, Recipe
from recommender.search.space import SearchSpace

pytestmark = pytest.mark.filterwarnings("ignore")


class Net(nn.Module):
    """Four conv layers, a residual add and a classifier (the shapes FX fuses in a ResNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.c = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.b(self.a(y)) + y)
        return self.fc(self.c(y).mean((2, 3)))


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Net()
    for mod in m.modules():  # non-trivial BN statistics, as after training
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def data(n: int = 2, seed: int = 0, model: nn.Module | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random images, labelled by ``model`` (its float predictions: 100 % accurate, so int8 damage
    shows) or at random."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]
    with torch.no_grad():
        return [(x, model(x).argmax(1) if model is not None else torch.randint(0, 5, (16,), generator=g)) for x in xs]


def with_outlier() -> nn.Module:
    """``fc`` gets one huge weight on an input feature that is always 0 (a dead ReLU channel of
    ``c``): harmless in float, but per-tensor int8 rounds the rest of ``fc`` to zero."""
    m = net()
    with torch.no_grad():
        m.c[1].running_mean[0] = 1e4  # channel 0 of c is always negative before its ReLU
        m.fc.weight[0, 0] = 1e3
    return m


# --------------------------------------------------------------------------- sensitivity


def test_simulated_sensitivity_equals_fx_isolated():
    m, b = net(), data()
    sim = measure_quant_sensitivity(m, b, method="loss")
    fx = measure_quant_sensitivity(m, b, method="fx")
    assert [x.name for x in sim.layers] == [x.name for x in fx.layers] == quantizable_layers(m)
    assert len(sim.layers) == 5
    for s, f in zip(sim.layers, fx.layers):
        assert s.loss_delta == pytest.approx(f.loss_delta, abs=2e-3), s.name
    assert sim.ranking()[0] == fx.ranking()[0]
    assert sim.base_loss == fx.base_loss and sim.images == 32


def test_sensitivity_finds_the_damaged_layer_and_keep_float_repairs_it():
    m = with_outlier()
    b = data(model=m)
    for method in ("loss", "weight-mse"):
        sens = measure_quant_sensitivity(m, b, method=method, per_channel=False)
        assert sens.ranking()[0] == "fc", method
    sens = measure_quant_sensitivity(m, b, per_channel=False)
    assert sens.layers[-1].loss_delta > 10 * max(abs(x.loss_delta) for x in sens.layers[:-1])
    x = torch.cat([x for x, _ in b])
    ref = m(x)
    errs = {}
    for k in (0, 1):
        cfg = Int8StaticConfig(observer="minmax", per_channel=False, keep_float=k)
        q, rep = apply_quantization(m, cfg, calibration=b, ranking=sens.ranking())
        errs[k] = float((q(x) - ref).abs().mean())
        assert rep.mode == ("fx" if k == 0 else "fx-partial")
        assert ("fc" in rep.float_modules) == (k == 1)
    assert errs[1] < 0.5 * errs[0]


def test_keep_float_without_ranking_measures_on_the_calibration_batches():
    m = with_outlier()
    b = data(model=m)
    q, rep = apply_quantization(m, Int8StaticConfig(observer="minmax", per_channel=False, keep_float=1),
                                calibration=b)
    assert list(k for k, r in rep.float_modules.items() if "keep_float" in r) == ["fc"]
    assert "sensitivity measured on this model" in rep.note


def test_weight_quant_error():
    w = torch.randn(4, 3, 3, 3)
    assert 0 < weight_quant_error(w) < 1e-3
    w[0, 0, 0, 0] = 1000.0
    assert weight_quant_error(w, per_channel=False) > 100 * weight_quant_error(w, per_channel=True)
    assert weight_quant_error(torch.zeros(2, 2)) == 0.0


def test_sensitivity_is_cached_per_key(tmp_path, monkeypatch):
    from recommender.cache import WeightsCache
    from recommender.compress import quant_sensitivity as qs

    cache, m, b = WeightsCache(tmp_path), net(), data(1)
    first = cached_quant_sensitivity(cache, "baseline0001", m, b)
    monkeypatch.setattr(qs, "measure_quant_sensitivity", lambda *a, **k: pytest.fail("measured again"))
    again = cached_quant_sensitivity(cache, "baseline0001", m, b)
    assert again.ranking() == first.ranking() and again.layers == first.layers
    with pytest.raises(pytest.fail.Exception):
        cached_quant_sensitivity(cache, "baseline0002", m, b)  # another baseline: measured


# --------------------------------------------------------------------------- observers


def test_default_mapping_is_pytorchs_and_options_swap_observers():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.qconfig import qconfig_equals

    assert qconfig_equals(int8_qconfig_mapping("x86").global_qconfig,
                          get_default_qconfig_mapping("x86").global_qconfig)
    qc = int8_qconfig_mapping("x86", "minmax", per_channel=False).global_qconfig
    assert type(qc.activation()) is MinMaxObserver and qc.activation().reduce_range
    assert type(qc.weight()) is MinMaxObserver and qc.weight().qscheme == torch.per_tensor_symmetric
    assert type(int8_qconfig_mapping("x86").global_qconfig.weight()) is PerChannelMinMaxObserver
    assert type(int8_qconfig_mapping("x86", "percentile").global_qconfig.activation()) is PercentileObserver


@pytest.mark.parametrize("observer", ["minmax", "moving-average", "percentile"])
def test_observers_quantize_close_to_float(observer):
    m, b = net(), data()
    q, rep = apply_quantization(m, Int8StaticConfig(observer=observer, calibration_batches=2), calibration=b)
    assert rep.mode == "fx" and rep.calibration_batches == 2
    x = b[0][0]
    ref = m(x)
    assert float((q(x) - ref).abs().max()) < 0.1 * float(ref.abs().max())


def test_percentile_observer_clips_outliers():
    x = torch.randn(10000)
    x[0] = 1000.0
    o = PercentileObserver(percentile=99.9)
    o(x)
    o(x)
    assert 2.0 < float(o.max_val) < 5.0 and -5.0 < float(o.min_val) < -2.0
    scale, _ = o.calculate_qparams()
    assert float(scale) < 0.1


# --------------------------------------------------------------------------- QAT


def test_qat_fine_tunes_fake_quantized_model_then_converts():
    m, b = net(), data()
    seen = []

    def finetune(model, steps):
        fq = [mod for mod in model.modules() if "FakeQuantize" in type(mod).__name__]
        seen.append((steps, len(fq), model.training))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        model.train()
        for i in range(steps):
            x, y = b[i % len(b)]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return 0.0

    cfg = Int8StaticConfig(qat_epochs=0.5, calibration_batches=2)
    q, rep = apply_quantization(m, cfg, calibration=b, finetune=finetune, steps_per_epoch=4)
    assert seen and seen[0][0] == 2 and seen[0][1] > 0
    assert rep.qat_steps == 2 and rep.mode == "fx" and rep.applied
    assert any("quantized" in type(mod).__module__ for mod in q.modules())
    x = b[0][0]
    assert float((q(x) - m(x)).abs().max()) < 0.2 * float(m(x).abs().max())
    # without a fine-tune callback: post-training, and the note says so
    _, rep2 = apply_quantization(m, cfg, calibration=b)
    assert rep2.qat_steps == 0 and "skipped" in rep2.note


def test_qat_time_limit_is_not_swallowed():
    class Stop(Exception):
        pass

    def finetune(model, steps):
        raise Stop("time limit")

    with pytest.raises(Stop):
        apply_quantization(net(), Int8StaticConfig(qat_epochs=1.0), calibration=data(1), finetune=finetune,
                           steps_per_epoch=3)


# --------------------------------------------------------------------------- configs and spaces


def test_old_recipe_dicts_and_descriptions_are_unchanged():
    assert Int8StaticConfig().to_dict() == {"scheme": "int8-static", "engine": "x86", "calibration_batches": 8,
                                            "observer": "histogram"}
    assert Int8StaticConfig().describe() == "int8-static/x86"
    assert Recipe(quant=QuantConfig("int8-static", observer="minmax")).to_dict()["quant"] == {
        "scheme": "int8-static", "engine": "x86", "calibration_batches": 8, "observer": "minmax"}
    new = QuantConfig("int8-static", keep_float=2, qat_epochs=1.0, per_channel=False)
    d = new.to_dict()
    assert d["keep_float"] == 2 and d["qat_epochs"] == 1.0 and d["per_channel"] is False
    assert make_config("quant", d) == new
    assert new.describe() == "int8-static/x86 per-tensor +2 float QAT 1 ep"
    with pytest.raises(RecommenderError):
        Int8StaticConfig(keep_float=-1)
    with pytest.raises(RecommenderError):
        Int8StaticConfig(qat_epochs=-0.5)
    with pytest.raises(RecommenderError):
        Int8StaticConfig(observer="kl")


def test_space_with_int8_dimensions_samples_and_reproduces_recipes():
    import optuna

    sp = SearchSpace.from_dict({"quant": {
        "scheme": {"choices": ["fp32", "int8-static"]},
        "observer": {"choices": ["minmax", "percentile"], "when": {"scheme": "int8-static"}},
        "per_channel": {"choices": [True, False], "when": {"scheme": "int8-static"}},
        "keep_float": {"choices": [0, 1, 2], "when": {"scheme": "int8-static"}},
        "qat_epochs": {"choices": [0.0, 1.0], "when": {"scheme": "int8-static"}}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        r = sp.sample(study.ask())
        seen.add((r.quant.method, getattr(r.quant, "keep_float", None)))
        assert sp.recipe({k: v for k, v in sp.params_for(r).items()}) == r
    assert ("int8-static", 0) in seen and ("int8-static", 2) in seen
    # a recipe at the defaults (fields left out of its dict) is a point of the space
    assert sp.params_for(Recipe(quant=QuantConfig("int8-static", observer="minmax")))["quant.keep_float"] == 0


# --------------------------------------------------------------------------- in the evaluator


def test_evaluator_measures_sensitivity_once_and_runs_keep_float_and_qat(tmp_path, monkeypatch):
    """An inheriting int8 candidate with keep_float uses the baseline's ranking, measured once and
    cached beside the baseline; a QAT candidate fine-tunes ``qat_epochs`` epochs of steps."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import TinyCNN

    from recommender.cache import WeightsCache
    from recommender.compress import quant_sensitivity as qs
    from recommender.data import load_dataset
    from recommender.evaluation import Evaluator
    from recommender.models import register_module
    from recommender.protocol import get_protocol

    calls = []
    real = qs.measure_quant_sensitivity
    monkeypatch.setattr(qs, "measure_quant_sensitivity", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.manual_seed(0)
    ev = Evaluator(register_module(TinyCNN()), load_dataset("digits"), get_protocol("smoke", threads=1, epochs=1),
                   cache=WeightsCache(tmp_path), latency=False)
    base = ev.evaluate_baseline()
    for k in (1, 2):
        e = ev.evaluate(Recipe(quant=QuantConfig("int8-static", observer="minmax", keep_float=k)), base)
        assert e.ok, e.reason
        assert f"quantization kept {k} modules in float" in " ".join(e.notes), e.notes
    assert len(calls) == 1  # one measurement for the study, on the baseline
    assert ev.quant_ranking(QuantConfig("int8-static", observer="minmax", keep_float=1)) == \
        ev.quant_sensitivity(QuantConfig("int8-static", observer="minmax")).ranking()
    e = ev.evaluate(Recipe(quant=QuantConfig("int8-static", observer="minmax", qat_epochs=0.25)), base)
    assert e.ok, e.reason
    steps = -(-0.25 * ev.steps_per_epoch() // 1)
    assert f"quantization-aware fine-tune: {int(steps)} steps" in " ".join(e.notes), e.notes
    assert ev.steps_per_epoch() == -(-512 // 64)


def test_untraceable_model_falls_back_to_the_weight_proxy():
    class Branchy(Net):
        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent: FX cannot trace it
                return x
            return super().forward(x)

    torch.manual_seed(0)
    m = Branchy().eval()
    sens = measure_quant_sensitivity(m, data(1), method="loss")
    assert sens.method == "weight-mse" and len(sens.layers) == 5
