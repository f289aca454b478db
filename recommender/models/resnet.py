"""CIFAR ResNet (resnet18..152) built from torchvision and an :class:`ArchConfig`.

The base model is ``torchvision.models.resnetNN(num_classes=nc)`` with ``conv1`` = conv 3x3
stride 1 and ``maxpool`` = identity (variants.md 1.1). Variants keep torchvision's forward
(conv1 -> bn1 -> relu -> maxpool -> layer1..4 -> avgpool -> flatten -> fc) and only swap the
modules in those slots: the stem, the blocks of each stage (a stage becomes an ``nn.Sequential``
of technique blocks, plus the pre-GAP conv and the no-FC head at the end of ``layer4``) and ``fc``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torchvision
from torch import nn
from torchvision.models.resnet import ResNet

from ..errors import ArchError
from . import blocks as B
from .arch import ArchConfig
from .registry import ModelFamily, register_family

#: blocks per stage for each depth (torchvision).
DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
}
BASE = (64, 128, 256, 512)
NARROW = (10, 22, 42, 86)  # the paper's ir/ghost/dice stage widths (ResNet-101 variants 6-12, 15)
INPUT_SIZE = 32


class CifarResNet(ResNet):
    """torchvision's ResNet with its slots filled by the builder (forward is torchvision's)."""

    def __init__(self, conv1: nn.Module, bn1: nn.Module, stages: list[nn.Module], fc: nn.Module):
        nn.Module.__init__(self)
        self.conv1, self.bn1 = conv1, bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = fc


@dataclass(frozen=True)
class BlockSpec:
    cin: int
    inner: int
    cout: int
    stride: int
    proj: bool
    size: int  # output spatial size at 32x32 input


def _scale(width: int, m: float, div: int = 1) -> int:
    if m == 1.0:
        return width
    return max(div, int(width * m / div + 0.5) * div)


def _stem(kind: str, width: int) -> nn.Module:
    if kind == "standard":
        return nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
    if kind == "factorized":
        return B.FactorizedConv(3, width)
    return B.DepthwiseSeparableConv(3, width)


def _check(arch: ArchConfig, model: str, basic: bool) -> None:
    kind = arch.block
    if kind != "fire" and arch.expand3 != "conv":
        raise ArchError(f"expand3 applies to fire blocks only, not to {kind!r} blocks")
    if kind != "ghost" and arch.ghost_dw != "proj":
        raise ArchError(f"ghost_dw applies to ghost blocks only, not to {kind!r} blocks")
    if kind != "standard" and arch.conv != "standard":
        raise ArchError(f"conv={arch.conv!r} applies to standard blocks; {kind!r} blocks have "
                        "their own convolutions")
    if kind == "fire" and arch.expand3 != "conv":
        raise ArchError("the ResNet residual fire block only has plain conv expands "
                        "(expand3='conv'); the other expand3 kinds are VGG fire units")
    if arch.groups > 1 and not (kind == "ghost" or (kind == "standard" and not basic)):
        what = f"{model}'s BasicBlock" if kind == "standard" else f"{kind!r} blocks"
        raise ArchError(f"grouped pointwise convs (groups={arch.groups}) do not apply to {what}; "
                        "use a bottleneck ResNet (resnet50+) or ghost blocks")
    if basic and kind == "standard" and (arch.inner or arch.inner_first):
        raise ArchError(f"{model} uses BasicBlock, which has no inner width; leave inner unset")
    for name in ("widths", "inner", "inner_first"):
        value = getattr(arch, name)
        if value is not None and len(value) != 4:
            raise ArchError(f"{name} needs 4 per-stage values for a ResNet, got {len(value)}")


def _plan(arch: ArchConfig, model: str) -> tuple[int, list[list[BlockSpec]]]:
    """Stem width and the per-stage block specs (in, inner, out, stride, proj, size)."""
    depths = DEPTHS[model]
    basic = model in ("resnet18", "resnet34")
    _check(arch, model, basic)
    kind, m = arch.block, arch.width_multiplier
    div = {"standard": arch.groups, "fire": 2, "ir": 1, "ghost": 2 * arch.groups, "dice": 2}[kind]
    if kind == "standard":
        widths = BASE if basic else tuple(4 * w for w in BASE)
        inner = BASE
    elif kind == "fire":
        widths = BASE if basic else tuple(4 * w for w in BASE)
        inner = tuple(w // 4 for w in widths)
    else:
        widths, inner = NARROW, BASE
    widths = tuple(_scale(w, m, div) for w in (arch.widths or widths))
    inner = tuple(_scale(w, m, div) for w in (arch.inner or inner))
    first = tuple(_scale(w, m, div) for w in arch.inner_first) if arch.inner_first else inner
    stem = _scale(arch.stem_width, m, arch.groups if kind == "ghost" else 1)

    plan: list[list[BlockSpec]] = []
    cin, size = stem, INPUT_SIZE
    for i, n in enumerate(depths):
        stage: list[BlockSpec] = []
        for j in range(n):
            if arch.downsample == "first":
                stride = 2 if i > 0 and j == 0 else 1
                cout, e = widths[i], (first[i] if j == 0 else inner[i])
            else:
                transition = j == n - 1 and i < 3
                stride = 2 if transition else 1
                cout = widths[i + 1] if transition else widths[i]
                e = first[i] if j == 0 else inner[i]
            if i == 3 and j == n - 1 and arch.last_width:
                cout = _scale(arch.last_width, m, div)
            # The paper's blocks always project in the network's first block; torchvision's
            # blocks project when the shape changes.
            proj = stride != 1 or cin != cout or (i == 0 and j == 0 and kind != "standard")
            size = size // stride
            stage.append(BlockSpec(cin, e, cout, stride, proj, size))
            cin = cout
        plan.append(stage)
    if arch.drop_last:
        if len(plan[3]) < 2:
            raise ArchError(f"drop_last would leave the last stage of {model} empty")
        plan[3].pop()
    return stem, plan


def _block(arch: ArchConfig, spec: BlockSpec, basic: bool) -> nn.Module:
    s, kw = spec, {"se": arch.se, "se_ratio": arch.se_ratio}
    if arch.block == "standard":
        if basic:
            return B.BasicBlock(s.cin, s.cout, s.stride, s.proj, conv=arch.conv, **kw)
        return B.Bottleneck(s.cin, s.inner, s.cout, s.stride, s.proj, conv=arch.conv,
                            groups=arch.groups, **kw)
    if arch.block == "fire":
        return B.ResidualFire(s.cin, s.inner, s.cout, s.stride, s.proj, **kw)
    if arch.block == "ir":
        return B.InvertedResidual(s.cin, s.inner, s.cout, s.stride, s.proj, **kw)
    if arch.block == "ghost":
        return B.GhostBottleneck(s.cin, s.inner, s.cout, s.stride, s.proj, dw_when=arch.ghost_dw,
                                 primary_groups=arch.groups, **kw)
    return B.DiCEBlock(s.cin, s.inner, s.cout, (s.size, s.size), s.stride, s.proj, **kw)


def _tv_init(module: nn.Module) -> None:
    """torchvision's ResNet initialisation (what the base model's own modules get)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def build_resnet(model: str, arch: ArchConfig, num_classes: int) -> nn.Module:
    """Build ``model`` (resnet18..152) for 32x32 inputs with the techniques of ``arch``."""
    if arch == ArchConfig():
        net = getattr(torchvision.models, model)(num_classes=num_classes)
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
        return net

    basic = model in ("resnet18", "resnet34")
    stem_w, plan = _plan(arch, model)
    stages = [nn.Sequential(*[_block(arch, spec, basic) for spec in stage]) for stage in plan]
    if arch.block == "standard":
        for stage in stages:
            _tv_init(stage)
    width = plan[3][-1].cout
    if arch.pre_gap:
        pre = _scale(arch.pre_gap, arch.width_multiplier)
        stages[3].append(B.ConvBNAct(width, pre, act="relu6"))
        width = pre
    if arch.head in ("nofc", "nofc-nobn"):
        stages[3].append(B.ConvBNAct(width, num_classes, bn=arch.head == "nofc", act="relu6"))
        fc: nn.Module = nn.Identity()
    elif arch.head == "gap-fc":
        fc = nn.Sequential(nn.Linear(width, num_classes), nn.Dropout(0.5))
    else:
        fc = nn.Linear(width, num_classes, bias=arch.head == "fc")
    conv1 = _stem(arch.stem, stem_w)
    bn1 = nn.BatchNorm2d(stem_w)
    if arch.stem == "standard":
        _tv_init(conv1)
    _tv_init(bn1)
    return CifarResNet(conv1, bn1, stages, fc)


FAMILY = register_family(ModelFamily(
    name="cifar-resnet",
    models=tuple(DEPTHS),
    build=build_resnet,
    space="resnet.yaml",
    presets="resnet101.yaml",
    techniques=frozenset({"stem", "stem_width", "block", "conv", "groups", "se", "se_ratio", "ghost_dw",
                          "widths", "inner", "inner_first", "downsample", "last_width", "drop_last",
                          "pre_gap", "head", "width_multiplier"}),
    style="cifar",
    min_input=8,
    deploy_input=INPUT_SIZE,
    stages=("layer1", "layer2", "layer3", "layer4"),
    description="CIFAR ResNets (3x3 stride-1 stem, no max-pool) with the paper's techniques",
))
