"""CIFAR VGG (vgg11/13/16/19 and their ``_bn`` forms) built from torchvision and an ArchConfig.

The base model (variants.md 1.2) is torchvision's feature extractor for the depth's configuration
(``torchvision.models.vgg.make_layers(cfgs[...], batch_norm)``, layer for layer the model's
``.features``, with torchvision's initialisation) followed by the CIFAR head ``flatten ->
512->4096->4096->nc`` with dropout; torchvision's 7x7 average pool and 25088-input classifier are
not used. Variants replace the unit at every conv position of the configuration (keeping the
max-pools between stages) and the head; every head other than ``fc`` drops the 5th max-pool.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import vgg as tv_vgg

from ..errors import ArchError
from . import blocks as B
from .arch import ArchConfig
from .registry import ModelFamily, register_family

CONFIGS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
INPUT_SIZE = 32


class CifarVGG(nn.Module):
    """``features`` then ``classifier`` (the classifier holds flatten / GAP itself)."""

    def __init__(self, features: nn.Sequential, classifier: nn.Module):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _stages(model: str) -> list[list[int]]:
    cfg = tv_vgg.cfgs[CONFIGS[model.removesuffix("_bn")]]
    stages: list[list[int]] = [[]]
    for v in cfg:
        if v == "M":
            stages.append([])
        else:
            stages[-1].append(int(v))
    return [s for s in stages if s]


def _tv_init(module: nn.Module) -> None:
    """torchvision's VGG initialisation of the feature extractor."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _check(arch: ArchConfig, model: str) -> None:
    default = ArchConfig()
    resnet_only = ("stem", "stem_width", "inner", "inner_first", "downsample", "last_width",
                   "drop_last", "pre_gap", "ghost_dw")
    for name in resnet_only:
        if getattr(arch, name) != getattr(default, name):
            raise ArchError(f"{name} applies to ResNet models only, not to {model}")
    if arch.block not in ("standard", "fire"):
        raise ArchError(f"block {arch.block!r} applies to ResNet models only; a VGG unit is "
                        "'standard' or 'fire'")
    if arch.block == "standard" and (arch.expand3 != "conv" or arch.groups > 1):
        raise ArchError("expand3 and groups apply to VGG fire units (block='fire') only")
    if arch.block == "fire" and arch.conv != "standard":
        raise ArchError(f"conv={arch.conv!r} applies to standard VGG units, not to fire units")
    if arch.block == "fire" and arch.groups > 1 and arch.expand3 not in ("grouped", "ghost"):
        raise ArchError(f"groups > 1 applies to fire expand3 'grouped' or 'ghost', not "
                        f"{arch.expand3!r}")
    if arch.widths is not None and len(arch.widths) != 5:
        raise ArchError(f"widths needs 5 per-stage values for a VGG, got {len(arch.widths)}")


def _unit(arch: ArchConfig, cin: int, cout: int, size: int, bn: bool) -> nn.Module:
    if arch.block == "fire":
        unit: nn.Module = B.FireModule(cin, cout, cout // 8, expand3=arch.expand3,
                                       groups=arch.groups, size=(size, size))
    else:
        layers: list[nn.Module] = [B.spatial_conv(arch.conv, cin, cout, bias=True if
                                                  arch.conv == "standard" else not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
        unit = nn.Sequential(*layers)
    if arch.se:
        unit = nn.Sequential(unit, B.SqueezeExcite(cout, arch.se_ratio))
    return unit


def build_vgg(model: str, arch: ArchConfig, num_classes: int) -> nn.Module:
    """Build ``model`` (vgg11..19, optionally ``_bn``) for 32x32 inputs with ``arch``."""
    _check(arch, model)
    bn = model.endswith("_bn")
    m = arch.width_multiplier
    div = 8 * arch.groups if arch.block == "fire" else 1
    stages = _stages(model)
    widths = arch.widths or tuple(s[0] for s in stages)
    widths = tuple(w if m == 1.0 else max(div, int(w * m / div + 0.5) * div) for w in widths)
    keep_last_pool = arch.head == "fc"

    if arch.block == "standard" and arch.conv == "standard" and not arch.se:
        # torchvision's own builder, on the configuration with this arch's widths
        cfg: list[int | str] = []
        for i, stage in enumerate(stages):
            cfg += [widths[i]] * len(stage) + ["M"]
        features = tv_vgg.make_layers(cfg if keep_last_pool else cfg[:-1], bn)
        _tv_init(features)
    else:
        layers: list[nn.Module] = []
        cin, size = 3, INPUT_SIZE
        for i, stage in enumerate(stages):
            for _ in stage:
                if arch.block == "fire" and widths[i] % 8:
                    raise ArchError(f"a VGG fire unit needs a width divisible by 8, got {widths[i]}")
                layers.append(_unit(arch, cin, widths[i], size, bn))
                cin = widths[i]
            if i < len(stages) - 1 or keep_last_pool:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
        features = nn.Sequential(*layers)
        if arch.block == "standard":
            _tv_init(features)

    width = widths[-1]
    if arch.head == "fc":
        hidden = 4096 if m == 1.0 else max(1, int(4096 * m + 0.5))
        head: nn.Module = B.FCStack(width, num_classes, hidden)
    elif arch.head == "gap-fc":
        head = B.GAPClassifier(width, num_classes, dropout=0.5)
    elif arch.head == "fc-nobias":
        head = B.GAPClassifier(width, num_classes, bias=False)
    else:
        head = B.ConvClassifier(width, num_classes, bn=arch.head == "nofc", act="relu")
    return CifarVGG(features, head)


FAMILY = register_family(ModelFamily(
    name="cifar-vgg",
    models=tuple(f"{v}{bn}" for v in CONFIGS for bn in ("", "_bn")),
    build=build_vgg,
    space="vgg.yaml",
    presets="vgg19.yaml",
    techniques=frozenset({"block", "conv", "expand3", "groups", "se", "se_ratio", "widths", "head",
                          "width_multiplier"}),
    style="cifar",
    # five max-pools and the flatten -> 512 head need 32 px
    min_input=INPUT_SIZE,
    deploy_input=INPUT_SIZE,
    description="CIFAR VGGs (torchvision features, 512->4096->4096 head) with the paper's techniques",
))
