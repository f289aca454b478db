"""The paper's variants as presets: names, exact baseline counts, spec-derived consistency.

Counts follow variants.md: trainable parameters, and fvcore FLOPs in eval mode at 1x3x32x32.
Only the baselines' totals (section 8) and the few exact facts of section 9 are asserted as
numbers; everything else is checked by relations derived from the block definitions.
"""

from __future__ import annotations

import logging
import math
import warnings
from functools import lru_cache

import pytest
import torch
from torch import nn

from recommender.errors import UnknownNameError
from recommender.models import build_model, get_preset, list_presets
from recommender.models import blocks as B

torch.set_num_threads(1)

RESNET = [f"paper-resnet101-{i}" for i in range(1, 16)]
VGG = [f"paper-vgg19-{i}" for i in range(1, 14)]
FAST_100 = ["paper-resnet101-1", "paper-resnet101-11", "paper-resnet101-13", "paper-resnet101-15",
            "paper-vgg19-1", "paper-vgg19-8", "paper-vgg19-13"]


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flop_analysis(model: nn.Module):
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        fca = FlopCountAnalysis(model, torch.randn(1, 3, 32, 32))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        fca.total()
    return fca


def flops(model: nn.Module) -> int:
    return flop_analysis(model).total()


@lru_cache(maxsize=None)
def built(name: str, nc: int) -> nn.Module:
    return build_model(get_preset(name).model, name, num_classes=nc).eval()


@lru_cache(maxsize=None)
def nparams(name: str, nc: int) -> int:
    return params(built(name, nc))


@lru_cache(maxsize=None)
def nflops(name: str, nc: int) -> int:
    return flops(built(name, nc))


# -- names ---------------------------------------------------------------------------------------


def test_every_paper_variant_is_a_preset():
    assert list_presets() == RESNET + VGG
    assert list_presets("resnet50") == RESNET
    assert list_presets("vgg11") == VGG
    p = get_preset("paper-resnet101-11")
    assert p.name == "paper-resnet101-11" and p.model == "resnet101" and p.description
    assert get_preset("paper-vgg19-1").model == "vgg19_bn"


def test_unknown_preset_and_model():
    with pytest.raises(UnknownNameError, match="paper-vgg19-13"):
        get_preset("paper-vgg19-14")
    with pytest.raises(UnknownNameError, match="resnet101"):
        list_presets("alexnet")


# -- builds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RESNET + VGG)
def test_preset_builds_and_runs_10(name):
    model = built(name, 10)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("name", FAST_100)
def test_preset_builds_and_runs_100(name):
    with torch.no_grad():
        assert built(name, 100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.slow
@pytest.mark.parametrize("name", RESNET + VGG)
def test_preset_builds_and_runs_100_all(name):
    with torch.no_grad():
        assert built(name, 100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


# -- exact baseline numbers (variants.md section 8) ----------------------------------------------


@pytest.mark.parametrize("name, nc, n_params, mflops", [
    ("paper-resnet101-1", 10, 42_512_970, 2520.22),
    ("paper-resnet101-1", 100, 42_697_380, 2520.41),
    ("paper-vgg19-1", 100, 39_327_652, 418.02),
])
def test_baseline_counts(name, nc, n_params, mflops):
    assert nparams(name, nc) == n_params
    assert round(nflops(name, nc) / 1e6, 2) == mflops


# -- exact facts stated in variants.md section 9 -------------------------------------------------


def test_section9_facts():
    assert round(nparams("paper-resnet101-14", 10) / 1e6, 3) == 1.175
    assert round(nparams("paper-resnet101-14", 100) / 1e6, 3) == 1.183
    assert round(nflops("paper-resnet101-10", 100) / 1e6, 2) == 32.84
    assert round(nflops("paper-resnet101-10", 10) / 1e6, 2) == 32.83
    ratio = 100 * nparams("paper-resnet101-3", 100) / nparams("paper-resnet101-1", 100)
    assert round(ratio, 2) == 83.33
    assert round(nflops("paper-resnet101-3", 100) / 1e6, 2) == 2141.77


# -- spec-derived consistency --------------------------------------------------------------------

# (e, output size, count) of the ghost bottlenecks of ResNet-101 variants 11-14 (tables 3.11/3.13)
GHOST_BLOCKS = [(64, 32, 3), (64, 16, 1), (128, 16, 3), (128, 8, 1), (256, 8, 22), (512, 4, 2)]


def test_se_adds_exactly_se_params_and_flops():
    se_params = sum(n * 2 * e * (e // 4) for e, _, n in GHOST_BLOCKS)
    se_flops = sum(n * (e * s * s + 2 * e * (e // 4)) for e, s, n in GHOST_BLOCKS)
    assert se_params == 1_024_000
    for plain, with_se in (("11", "12"), ("13", "14")):
        a, b = f"paper-resnet101-{plain}", f"paper-resnet101-{with_se}"
        assert nparams(b, 10) - nparams(a, 10) == se_params
        assert nflops(b, 10) - nflops(a, 10) == se_flops


def _unused(model: nn.Module) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1].startswith("unused_")]


@pytest.mark.parametrize("name, expected", [
    # ResNet 15: DW 3x3 e + BN(e) = 11e in each projecting block, e = 64, 64, 128, 512
    ("paper-resnet101-15", 11 * (64 + 64 + 128 + 512)),
    # VGG 5: BN(s) at each of the 16 positions, s = l/8
    ("paper-vgg19-5", 2 * (8 * 2 + 16 * 2 + 32 * 4 + 64 * 8)),
    # VGG 8 / 12: BN(l/2) of expand3 at each position
    ("paper-vgg19-8", 2 * (32 * 2 + 64 * 2 + 128 * 4 + 256 * 8)),
    ("paper-vgg19-12", 2 * (32 * 2 + 64 * 2 + 128 * 4 + 256 * 8)),
])
def test_registered_unused_modules(name, expected):
    model = built(name, 10)
    unused = _unused(model)
    assert unused and sum(params(m) for m in unused) == expected
    called: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: called.append(mod)) for m in unused]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert not called
    # no other preset carries unused modules
    others = [n for n in RESNET + VGG if n not in
              ("paper-resnet101-15", "paper-vgg19-5", "paper-vgg19-8", "paper-vgg19-12")]
    assert not any(_unused(built(n, 10)) for n in others[::4])


def test_unused_modules_cost_no_flops():
    by_module = flop_analysis(built("paper-vgg19-8", 10)).by_module()
    names = [n for n, _ in built("paper-vgg19-8", 10).named_modules() if "unused_" in n]
    assert names and all(by_module.get(n, 0) == 0 for n in names)


def _head_delta(name: str) -> int:
    """params(nc=100) - params(nc=10) from the head definitions of variants.md 2.9."""
    arch, vgg = get_preset(name).arch, name.startswith("paper-vgg")
    model = built(name, 10)
    if arch.head == "fc":
        cin = 4096 if vgg else model.fc.in_features
        return 90 * (cin + 1)
    if arch.head == "gap-fc":
        return 90 * (512 + 1)
    if arch.head == "fc-nobias":
        return 90 * model.fc.in_features
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    bn = 2 if arch.head == "nofc" else 0
    return 90 * (conv.in_channels + (1 if vgg else 0) + bn)


@pytest.mark.parametrize("name", FAST_100 + ["paper-resnet101-6", "paper-vgg19-2", "paper-vgg19-9"])
def test_class_count_changes_only_the_head(name):
    assert nparams(name, 100) - nparams(name, 10) == _head_delta(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", RESNET + VGG)
def test_class_count_changes_only_the_head_all(name):
    assert nparams(name, 100) - nparams(name, 10) == _head_delta(name)


def test_structure_of_key_variants():
    r13 = built("paper-resnet101-13", 10)
    assert r13.layer1[0].shortcut is not None and r13.layer1[0].dw is None  # flavour S
    assert r13.layer1[0].ghost1.primary.groups == 4
    r11 = built("paper-resnet101-11", 10)
    assert r11.layer1[0].dw is not None and r11.layer1[0].dw[0].stride == (1, 1)  # flavour P
    assert [len(r11.layer1), len(r11.layer2), len(r11.layer3), len(r11.layer4)] == [3, 4, 23, 3]
    assert isinstance(r11.fc, nn.Identity) and isinstance(r11.layer4[-1][-1], nn.ReLU6)
    r9 = built("paper-resnet101-9", 10)
    assert r9.layer1[0].downsample is not None and r9.layer1[0].conv1.in_channels == 10
    r6 = built("paper-resnet101-6", 10)
    assert r6.layer1[-1].conv2.stride == (2, 2) and r6.layer2[0].conv2.stride == (1, 1)
    assert r6.fc.in_features == 2048 and r6.layer4[2].conv3.out_channels == 512
    v2 = built("paper-vgg19-2", 10)
    assert sum(isinstance(m, nn.MaxPool2d) for m in v2.features) == 4
    assert isinstance(v2.classifier[-1], nn.Dropout)  # dropout on the logits
    assert sum(isinstance(m, nn.MaxPool2d) for m in built("paper-vgg19-1", 10).features) == 5
    v13 = built("paper-vgg19-13", 10)
    sizes = [m.expand3.size[0] for m in v13.features if isinstance(m, B.FireModule)]
    assert sizes == [32] * 2 + [16] * 2 + [8] * 4 + [4] * 4 + [2] * 4
    gcds = [m.squeeze[0].groups for m in v13.features if isinstance(m, B.FireModule)]
    assert gcds == [1, 8, 16, 16] + [32] * 4 + [64] * 8
    assert all(math.gcd(m.expand3.proj.in_channels, m.expand3.proj.out_channels)
               == m.expand3.proj.groups for m in v13.features if isinstance(m, B.FireModule))


@pytest.mark.slow
def test_print_count_table(capsys):
    rows = []
    for name in RESNET + VGG:
        rows.append(f"{name:20s} " + "  ".join(
            f"nc={nc:<3d} {nparams(name, nc):>11,d} {nflops(name, nc) / 1e6:9.2f}" for nc in (10, 100)))
    with capsys.disabled():
        print("\n" + "\n".join(rows))
