"""recommender.compress: pruning, quantization, pipeline, checkpoints."""

import torch

torch.set_num_threads(1)

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from recommender.compress import (  # noqa: E402
    apply_pruning,
    apply_quantization,
    compress,
    get_backend,
    list_backends,
    load_into,
    load_state,
    save_state,
)
from recommender.errors import CheckpointError, UnknownNameError  # noqa: E402
from recommender.measure import count_flops, count_params, latency_ms, size_mb  # noqa: E402
from recommender.models import build_model, get_preset, list_presets  # noqa: E402
from recommender.recipe import PruneConfig, QuantConfig, Recipe  # noqa: E402

# the quantized cat kernel warns on every forward when it requantizes its inputs (correct, slower)
pytestmark = pytest.mark.filterwarnings("ignore:All inputs of this cat operator")

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CAL = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def preset(name: str, nc: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset(name).model, name, num_classes=nc).eval()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.a(y) + y)
        return self.fc(self.pool(y).flatten(1))


class Untraceable(Tiny):
    """Data-dependent control flow in a submodule: FX cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Branchy()


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        if x.sum() > 1e9:  # never true, but FX cannot know
            return x
        return self.bn(self.conv(x))


# ------------------------------------------------------------------------------------ unstructured


@pytest.mark.parametrize("target", [0.3, 0.59, 0.893])
def test_unstructured_hits_global_sparsity(target):
    m = preset("paper-resnet101-11")
    calls = []
    pm, rep = apply_pruning(
        m, PruneConfig("unstructured-l1", target, finetune_steps=2), example_input=X,
        finetune=lambda model, steps: calls.append(steps),
    )
    convs = [mod.weight for mod in pm.modules() if type(mod) is nn.Conv2d]
    zeros = sum(int((w == 0).sum()) for w in convs)
    total = sum(w.numel() for w in convs)
    assert abs(zeros / total - target) <= 0.001
    assert abs(rep.achieved_sparsity - target) <= 0.001
    assert rep.rounds[0] == pytest.approx(0.2, abs=0.001)
    assert all(abs(r - (1 - 0.8 ** (i + 1))) < 0.001 for i, r in enumerate(rep.rounds[:-1]))
    assert len(calls) == len(rep.rounds) and calls[0] == 2
    assert not any(n.endswith("_orig") for n, _ in pm.named_parameters()), "masks must be permanent"
    assert rep.params_after == rep.params_before and rep.nonzero_after < rep.nonzero_before
    assert rep.sparse_size_mb < rep.size_mb
    assert all(int((mod.weight == 0).sum()) == 0 for mod in m.modules() if type(mod) is nn.Conv2d), \
        "the input model must not be modified"
    assert pm(X).shape == (1, 10)


def test_unstructured_linear_optional():
    m = Tiny()
    pm, _ = apply_pruning(m, PruneConfig("unstructured-l1", 0.5), example_input=X)
    assert int((pm.fc.weight == 0).sum()) == 0
    pm, _ = apply_pruning(m, PruneConfig("unstructured-l1", 0.5), example_input=X, include_linear=True)
    assert int((pm.fc.weight == 0).sum()) > 0


def test_no_pruning_is_identity():
    m = Tiny()
    pm, rep = apply_pruning(m, PruneConfig(), example_input=X)
    assert pm is m and rep.params_after == rep.params_before


# ------------------------------------------------------------------------------------ structured


def test_structured_shrinks_dense_model():
    import torchvision

    m = torchvision.models.resnet18(num_classes=10).eval()
    pm, rep = apply_pruning(m, PruneConfig("structured-channel", 0.5), example_input=X)
    assert rep.prunable and "fc" in rep.ignored_layers
    assert count_params(pm) < 0.4 * count_params(m)
    assert count_flops(pm) < 0.4 * count_flops(m)
    assert latency_ms(pm, repeats=5, warmup=1) < latency_ms(m, repeats=5, warmup=1)
    assert pm(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_structured_taylor_with_batches():
    m = Tiny()
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    pm, rep = apply_pruning(m, PruneConfig("structured-channel", 0.3, importance="taylor"),
                            example_input=X, batches=batches)
    assert rep.prunable and rep.params_after < rep.params_before
    assert all(p.grad is None for p in pm.parameters())


def test_structured_channel_shuffle_does_not_crash():
    import torchvision

    m = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    pm, rep = apply_pruning(m, PruneConfig("structured-channel", 0.3), example_input=X)
    assert pm(X).shape == (1, 10)
    assert any("shuffle" in why for why in rep.ignored_layers.values())


# paper-vgg19-13 (a minute on 2 cores) runs with the full matrix under -m slow
REPRESENTATIVE = ["paper-resnet101-1", "paper-resnet101-11", "paper-resnet101-13", "paper-resnet101-15",
                  "paper-vgg19-8"]


def _prune_and_quantize(name: str):
    m = preset(name)
    pm, prep = apply_pruning(m, PruneConfig("structured-channel", 0.3), example_input=X, measure_flops=False)
    assert pm(torch.randn(2, 3, 32, 32)).shape == (2, 10), name
    assert prep.params_after <= prep.params_before
    if not prep.prunable:
        assert prep.note.startswith("not prunable")
    q, qrep = apply_quantization(pm, QuantConfig("int8-static", "x86", 2), calibration=CAL)
    assert q(torch.randn(2, 3, 32, 32)).shape == (2, 10), name
    assert qrep.applied, qrep.note
    return prep, qrep


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_presets_survive_structured_and_int8(name):
    _prune_and_quantize(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [p for p in list_presets() if p.startswith(("paper-resnet101-", "paper-vgg19-"))])
def test_all_presets_survive_structured_and_int8(name):
    _prune_and_quantize(name)


# ------------------------------------------------------------------------------------ quantization


def test_int8_static_shrinks_resnet101_baseline():
    m = preset("paper-resnet101-1")
    q, rep = apply_quantization(m, QuantConfig("int8-static", "x86", 2), calibration=CAL)
    assert rep.mode == "fx" and not rep.float_modules
    assert size_mb(m) / size_mb(q) >= 3.5
    out, ref = q(X), m(X)
    assert out.shape == ref.shape


@pytest.mark.parametrize("scheme,engine", [("int8-static", "qnnpack"), ("int8-dynamic", "x86"), ("fp16", "x86"), ("fp32", "x86")])
def test_schemes_run(scheme, engine):
    m = Tiny().eval()
    q, rep = apply_quantization(m, QuantConfig(scheme, engine, 2), calibration=CAL)
    with torch.no_grad():
        out, ref = q(X), m(X)
    assert out.dtype == torch.float32 and out.shape == (1, 10)
    assert torch.allclose(out, ref, atol=0.2 * float(ref.abs().max()) + 1e-3)
    if scheme == "int8-dynamic":
        assert "stem.0" in rep.float_modules  # convs stay float
    if scheme == "fp16":
        assert rep.size_mb_after < rep.size_mb_before


def test_minmax_observer_option():
    m = Tiny().eval()
    q, rep = apply_quantization(m, QuantConfig("int8-static", "x86", 2, observer="minmax"), calibration=CAL)
    assert rep.mode == "fx"
    with torch.no_grad():
        out, ref = q(X), m(X)
    assert torch.allclose(out, ref, atol=0.2 * float(ref.abs().max()) + 1e-3)


def test_engines_can_coexist():
    m = Tiny().eval()
    qa, _ = apply_quantization(m, QuantConfig("int8-static", "x86", 1), calibration=CAL)
    qb, _ = apply_quantization(m, QuantConfig("int8-static", "qnnpack", 1), calibration=CAL)
    assert qa(X).shape == qb(X).shape == qa(X).shape


def test_untraceable_part_stays_float_and_is_reported():
    m = Untraceable().eval()
    q, rep = apply_quantization(m, QuantConfig("int8-static", "x86", 2), calibration=CAL)
    assert rep.applied and "a" in rep.float_modules
    assert q(X).shape == (1, 10)


def test_backend_registry():
    assert {"fp32", "fp16", "int8-static", "int8-dynamic"} <= set(list_backends())
    with pytest.raises(UnknownNameError):
        get_backend("int4")


# ------------------------------------------------------------------------------------ pipeline


def test_compress_prunes_then_quantizes():
    m = Tiny().eval()
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    recipe = Recipe(prune=PruneConfig("structured-channel", 0.5), quant=QuantConfig("int8-static"))
    q, rep = compress(m, recipe, example_input=X, batches=iter(batches))
    assert rep.prune.params_after < rep.prune.params_before
    assert rep.quant.applied and rep.quant.calibration_batches == 2
    assert q(X).shape == (1, 10)
    assert count_flops(q, float_model=rep.float_model) == count_flops(rep.float_model)
    assert set(rep.to_dict()) == {"prune", "quant", "seconds"}


def test_repacking_int8_weights_changes_no_output():
    """compress() packs the int8 weights again after conversion (some packings ran 200x slower):
    the same weights, the same outputs."""
    import copy

    from recommender.compress.quantize import repack_weights

    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    q, _ = compress(Tiny().eval(), Recipe(quant=QuantConfig("int8-static")), example_input=X, batches=batches)
    before = q(X)
    again = repack_weights(copy.deepcopy(q), "x86")
    assert torch.equal(before, again(X)) and torch.equal(before, q(X))


def test_adaptive_bn_reestimates_the_pruned_models_statistics():
    """``bn_images``: after pruning (and its recovery), every BN's running statistics are those of
    the pruned network on the given images; without them, they are left as training left them."""
    torch.manual_seed(0)
    m = Tiny().eval()
    images = [torch.randn(8, 3, 32, 32) + 2.0 for _ in range(3)]
    recipe = Recipe(prune=PruneConfig("unstructured-l1", 0.5))
    stale, _ = compress(m, recipe, example_input=X, batches=None)
    fresh, _ = compress(m, recipe, example_input=X, batches=None, bn_images=images)
    bn = next(mod for mod in fresh.modules() if isinstance(mod, nn.BatchNorm2d))
    conv_out = []
    for mod in fresh.modules():  # the first conv feeds the first BN
        if isinstance(mod, nn.Conv2d):
            with torch.no_grad():
                conv_out = [mod(x) for x in images]
            break
    mean = torch.cat(conv_out).mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, mean, atol=1e-4)
    stale_bn = next(mod for mod in stale.modules() if isinstance(mod, nn.BatchNorm2d))
    assert torch.equal(stale_bn.running_mean, next(mod for mod in m.modules()
                                                   if isinstance(mod, nn.BatchNorm2d)).running_mean)
    # nothing pruned: nothing re-estimated
    same, _ = compress(m, Recipe(), example_input=X, batches=None, bn_images=images)
    assert torch.equal(next(mod for mod in same.modules() if isinstance(mod, nn.BatchNorm2d)).running_mean,
                       stale_bn.running_mean)


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tmp_path):
    m = Tiny()
    p = save_state(tmp_path / "w.pt", m, {"acc": 0.5})
    sd, meta = load_state(p)
    assert meta == {"acc": 0.5} and set(sd) == set(m.state_dict())
    m2 = Tiny()
    load_into(m2, p)
    assert torch.equal(m2.fc.weight, m.fc.weight)
    with pytest.raises(CheckpointError):
        load_into(nn.Linear(2, 2), p)


def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path):
    p = save_state(tmp_path / "w.pt", Tiny())
    data = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    for bad in ("trunc.pt", "junk.pt", "missing.pt"):
        with pytest.raises(CheckpointError) as info:
            load_state(tmp_path / bad)
        assert "\n" not in str(info.value)
