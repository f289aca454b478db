"""Model catalog: base models, ArchConfig, technique blocks, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from recommender.errors import ArchError, UnknownNameError
from recommender.models import ArchConfig, build_model, list_models, list_presets
from recommender.models import blocks as B
from recommender.recipe import Recipe

torch.set_num_threads(1)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(model: nn.Module, nc: int, size: int = 32) -> None:
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, nc)
    assert torch.isfinite(out).all()


# -- catalog -------------------------------------------------------------------------------------


def test_list_models():
    names = list_models()
    for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
              "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"):
        assert n in names


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        build_model("resnet7")
    assert "resnet7" in str(err.value) and "resnet101" in str(err.value) and "vgg19_bn" in str(err.value)
    assert err.value.kind == "model" and "vgg16" in err.value.valid


def test_unknown_preset_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        build_model("resnet50", "paper-resnet101-99")
    assert "paper-resnet101-11" in str(err.value)


def test_preset_of_other_family_is_arch_error():
    with pytest.raises(ArchError, match="resnet"):
        build_model("vgg16", "paper-resnet101-1")


@pytest.mark.parametrize("model", ["resnet18", "resnet34", "resnet50"])
def test_resnet_base_is_torchvision_adapted(model):
    net = build_model(model, num_classes=10)
    assert isinstance(net, torchvision.models.ResNet)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    tv = getattr(torchvision.models, model)(num_classes=10)
    # only conv1 changes: 7x7 -> 3x3 (3*64*(49-9) fewer weights)
    assert n_params(tv) - n_params(net) == 3 * 64 * 40
    run(net, 10)


def test_vgg_base_uses_torchvision_features():
    net = build_model("vgg16_bn", num_classes=10)
    ref = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)
    assert [type(m) for m in net.features] == [type(m) for m in ref]
    plain = build_model("vgg16", num_classes=10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.features)
    assert sum(isinstance(m, nn.MaxPool2d) for m in plain.features) == 5
    head = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in head] == [(512, 4096), (4096, 4096), (4096, 10)]
    run(net, 10)


# -- ArchConfig ----------------------------------------------------------------------------------


def test_archconfig_default_and_hash():
    assert ArchConfig() == ArchConfig.from_dict({})
    assert hash(ArchConfig()) == hash(ArchConfig.from_dict({}))
    assert ArchConfig().describe() == "baseline"
    assert len({ArchConfig(), ArchConfig(se=True), ArchConfig(se=True)}) == 2


@pytest.mark.parametrize("name", list_presets())
def test_preset_arch_json_roundtrip(name):
    from recommender.models import get_preset

    arch = get_preset(name).arch
    back = ArchConfig.from_dict(json.loads(json.dumps(arch.to_dict())))
    assert back == arch and hash(back) == hash(arch)
    assert ArchConfig.from_json(arch.to_json()) == arch
    text = arch.describe()
    assert text and "\n" not in text and len(text) < 160


def test_recipe_roundtrip_with_arch():
    r = Recipe(arch=ArchConfig(block="ghost", groups=4, ghost_dw="stride", widths=(16, 24, 40, 88)))
    assert Recipe.from_json(r.to_json()) == r


def test_lists_become_tuples():
    a = ArchConfig(widths=[10, 22, 42, 86])
    assert a.widths == (10, 22, 42, 86) and hash(a)


@pytest.mark.parametrize("data, match", [
    ({"blok": "fire"}, "unknown arch config keys"),
    ({"block": "resnext"}, "unknown block 'resnext'; valid: standard, fire"),
    ({"head": "mlp"}, "valid: fc, fc-nobias"),
    ({"groups": 0}, "groups"),
    ({"widths": [10, -1, 3, 4]}, "widths"),
    ({"width_multiplier": 0}, "width_multiplier"),
    ({"se": "yes"}, "se must be"),
])
def test_archconfig_bad_input(data, match):
    with pytest.raises(ArchError, match=match):
        ArchConfig.from_dict(data)


# -- techniques on other depths ------------------------------------------------------------------

RESNET_TECHNIQUES = [
    dict(block="fire"),
    dict(stem="factorized", conv="factorized"),
    dict(stem="dws", conv="depthwise"),
    dict(conv="depthwise", groups=4),
    dict(se=True),
    dict(block="ir", downsample="last", last_width=512, pre_gap=1024),
    dict(block="ir", drop_last=True, pre_gap=512, head="nofc", stem_width=10),
    dict(block="ghost", inner_first=(64, 64, 128, 512), head="fc-nobias"),
    dict(block="ghost", ghost_dw="stride", groups=4, se=True, widths=(16, 24, 40, 88), stem_width=16),
    dict(block="dice", head="fc-nobias"),
    dict(head="gap-fc"),
    dict(head="nofc-nobn"),
    dict(width_multiplier=0.5),
    dict(block="ghost", groups=4, width_multiplier=0.5),
]
VGG_TECHNIQUES = [
    dict(head="gap-fc"), dict(conv="factorized", head="gap-fc"), dict(conv="depthwise"),
    dict(block="fire"), dict(block="fire", expand3="grouped"),
    dict(block="fire", expand3="grouped", groups=4, se=True, head="nofc"),
    dict(block="fire", expand3="ghost", head="nofc-nobn"),
    dict(block="fire", expand3="ghost", groups=4, se=True),
    dict(block="fire", expand3="dice", head="nofc"),
    dict(se=True, head="fc-nobias"), dict(width_multiplier=0.5), dict(widths=(32, 64, 128, 256, 256)),
]


@pytest.mark.parametrize("tech", RESNET_TECHNIQUES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_technique_on_resnet50(tech):
    arch = ArchConfig(**tech)
    net = build_model("resnet50", arch, num_classes=7)
    assert len(net.layer3) >= 5  # resnet50's 3/4/6/3 blocks (drop_last only touches layer4)
    run(net, 7)


@pytest.mark.parametrize("tech", VGG_TECHNIQUES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_technique_on_vgg16(tech):
    run(build_model("vgg16_bn", ArchConfig(**tech), num_classes=7), 7)


def test_resnet18_basic_block_techniques():
    base = n_params(build_model("resnet18"))
    assert n_params(build_model("resnet18", ArchConfig(conv="depthwise"))) < base / 4
    run(build_model("resnet18", ArchConfig(conv="factorized", se=True)), 10)
    run(build_model("resnet18", "paper-resnet101-13"), 10)
    with pytest.raises(ArchError, match="BasicBlock"):
        build_model("resnet18", ArchConfig(groups=4))
    with pytest.raises(ArchError, match="BasicBlock"):
        build_model("resnet34", ArchConfig(inner=(16, 32, 64, 128)))


def test_preset_on_other_depth_keeps_depth_and_widths():
    r50 = build_model("resnet50", "paper-resnet101-11", num_classes=100)
    assert [len(r50.layer1), len(r50.layer2), len(r50.layer3)] == [3, 4, 6]
    assert len(r50.layer4) == 3  # 2 ghost bottlenecks (last dropped) + the no-FC head conv
    assert r50.layer3[0].ghost1.primary.in_channels == 22
    run(r50, 100)
    v16 = build_model("vgg16_bn", "paper-vgg19-13", num_classes=100)
    assert sum(isinstance(m, B.FireModule) for m in v16.modules()) == 13
    run(v16, 100)


@pytest.mark.parametrize("model, tech, match", [
    ("vgg16", dict(block="ir"), "ResNet models only"),
    ("vgg16", dict(stem="dws"), "ResNet models only"),
    ("vgg16", dict(block="fire", expand3="conv", groups=4), "groups"),
    ("vgg16", dict(block="fire", expand3="dice", groups=4), "groups"),
    ("vgg16", dict(widths=(64, 128)), "5 per-stage"),
    ("resnet50", dict(widths=(64, 128, 256)), "4 per-stage"),
    ("resnet50", dict(block="fire", expand3="ghost"), "expand3"),
    ("resnet50", dict(block="ir", conv="depthwise"), "own convolutions"),
    ("resnet50", dict(block="ir", groups=4), "groups"),
    ("resnet50", dict(ghost_dw="stride"), "ghost"),
    ("resnet50", dict(block="ghost", groups=4), "groups"),  # 10/22/42/86 not divisible
])
def test_inapplicable_technique_raises(model, tech, match):
    with pytest.raises(ArchError, match=match):
        build_model(model, ArchConfig(**tech))


def test_width_multiplier_scales():
    full = n_params(build_model("resnet50", ArchConfig(block="ghost")))
    half = build_model("resnet50", ArchConfig(block="ghost", width_multiplier=0.5))
    assert n_params(half) < full / 2
    assert half.conv1.out_channels == 32 and half.layer1[0].ghost2.bn.num_features == 6
    assert n_params(build_model("vgg11_bn", ArchConfig(width_multiplier=0.25))) < \
        n_params(build_model("vgg11_bn")) / 8


def test_dice_runs_at_other_resolutions():
    net = build_model("resnet18", ArchConfig(block="dice", head="fc-nobias", width_multiplier=0.5))
    for size in (16, 48, 64):
        run(net, 10, size)


# -- blocks --------------------------------------------------------------------------------------


def test_channel_shuffle_permutation():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert B.channel_shuffle(x, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_ghost_module_cat_order_and_counts():
    gm = B.GhostModule(16, 32, groups=4)
    assert n_params(gm) == 16 * 16 // 4 + 16 * 9 + 2 * 32
    out = gm(torch.randn(1, 16, 8, 8))
    assert out.shape == (1, 32, 8, 8)


def test_ghost_bottleneck_flavours():
    p = B.GhostBottleneck(16, 64, 16, 1, True, dw_when="proj")
    s = B.GhostBottleneck(16, 64, 16, 1, True, dw_when="stride", primary_groups=4)
    assert p.dw is not None and s.dw is None
    assert B.GhostBottleneck(16, 64, 24, 2, True, dw_when="stride", primary_groups=4).dw is not None


def test_se_counts():
    se = B.SqueezeExcite(64)
    assert n_params(se) == 2 * 64 * 16
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in se.modules())


def test_factorized_conv_shapes():
    f = B.FactorizedConv(8, 16, stride=2)
    assert f[0].weight.shape == (8, 8, 3, 1) and f[1].weight.shape == (16, 8, 1, 3)
    assert f(torch.randn(1, 8, 16, 16)).shape == (1, 16, 8, 8)


@pytest.mark.parametrize("expand3, groups, form", [
    ("conv", 1, "A"), ("grouped", 1, "B"), ("grouped", 4, "C"), ("ghost", 1, "D"), ("ghost", 4, "E"),
    ("dice", 1, "F"),
])
def test_fire_module_forms(expand3, groups, form):
    fire = B.FireModule(128, 256, 32, expand3=expand3, groups=groups, size=(8, 8))
    assert fire.form == form
    assert fire(torch.randn(1, 128, 8, 8)).shape == (1, 256, 8, 8)


def test_dice_units():
    d = B.DiCE(64, 10, (8, 8))
    assert d.proj.groups == 2 and d.gate[1].out_channels == 16
    assert d(torch.randn(1, 64, 8, 8)).shape == (1, 10, 8, 8)
    sd = B.StridedDiCE(64, 22, (8, 8))
    assert sd(torch.randn(1, 64, 16, 16)).shape == (1, 22, 8, 8)
