"""ImageNet-style torchvision models as a registered family, under the ``tv:`` namespace.

``tv:resnet50`` is torchvision's own ResNet-50 (7x7 stride-2 stem, max-pool), not the paper's
CIFAR ResNet-50 (``resnet50``). Models are built untrained with torchvision's initialisation and
``num_classes`` outputs; nothing is downloaded (a user's trained or pretrained weights come from a
local state dict: ``--weights PATH`` / ``--checkpoint PATH``).

Architecture setting supported: ``width_multiplier``, for the builders that have one
(``mobilenet_v2``, ``mobilenet_v3_small/large``, ``efficientnet_b0``, ``shufflenet_v2_x1_0``).
Their other compression methods (structured channel pruning, the paper's unstructured pruning,
fp16 / int8) come from the generic search space ``torchvision.yaml``.
"""

from __future__ import annotations

from typing import Callable

import torchvision
from torch import nn
from torchvision import models as tvm

from .arch import ArchConfig
from .registry import ModelFamily, register_family

NAMESPACE = "tv"
#: Smallest input side: every network here downsamples 32x.
MIN_INPUT = 32


def _div(v: float, d: int = 8) -> int:
    return max(d, int(v / d + 0.5) * d)


def _mobilenet_v2(nc: int, m: float) -> nn.Module:
    return tvm.MobileNetV2(num_classes=nc, width_mult=m)


def _mobilenet_v3(kind: str) -> Callable[[int, float], nn.Module]:
    def build(nc: int, m: float) -> nn.Module:
        from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf

        setting, last = _mobilenet_v3_conf(kind, width_mult=m)
        return MobileNetV3(setting, last, num_classes=nc)

    return build


def _efficientnet_b0(nc: int, m: float) -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=m, depth_mult=1.0)
    return EfficientNet(setting, 0.2, num_classes=nc, last_channel=last)


def _shufflenet_v2(nc: int, m: float) -> nn.Module:
    # torchvision's x1_0 widths; the x0_5 / x1_5 variants scale the three stages the same way
    stages = [24] + [_div(c * m, 4) for c in (116, 232, 464)] + [1024]
    return tvm.ShuffleNetV2([4, 8, 4], stages, num_classes=nc)


def _fixed(fn: Callable[..., nn.Module]) -> Callable[[int, float], nn.Module]:
    return lambda nc, m: fn(weights=None, num_classes=nc)


#: name -> (builder(num_classes, width_multiplier), has a width multiplier)
_BUILDERS: dict[str, tuple[Callable[[int, float], nn.Module], bool]] = {
    "resnet18": (_fixed(tvm.resnet18), False),
    "resnet34": (_fixed(tvm.resnet34), False),
    "resnet50": (_fixed(tvm.resnet50), False),
    "resnet101": (_fixed(tvm.resnet101), False),
    "mobilenet_v2": (_mobilenet_v2, True),
    "mobilenet_v3_small": (_mobilenet_v3("mobilenet_v3_small"), True),
    "mobilenet_v3_large": (_mobilenet_v3("mobilenet_v3_large"), True),
    "efficientnet_b0": (_efficientnet_b0, True),
    "shufflenet_v2_x1_0": (_shufflenet_v2, True),
    "regnet_x_400mf": (_fixed(tvm.regnet_x_400mf), False),
}


def build_torchvision(model: str, arch: ArchConfig, num_classes: int) -> nn.Module:
    """Build ``tv:<name>`` untrained (torchvision's init) with ``num_classes`` outputs and the
    arch's width multiplier where the builder has one."""
    FAMILY.check_arch(model, arch)
    fn, _ = _BUILDERS[model.split(":", 1)[1]]
    return fn(num_classes, float(arch.width_multiplier))


FAMILY = register_family(ModelFamily(
    name="torchvision",
    models=tuple(f"{NAMESPACE}:{n}" for n in _BUILDERS),
    build=build_torchvision,
    space="torchvision.yaml",
    presets=None,
    techniques=frozenset(),
    per_model_techniques={f"{NAMESPACE}:{n}": frozenset({"width_multiplier"})
                          for n, (_, wm) in _BUILDERS.items() if wm},
    style="imagenet",
    min_input=MIN_INPUT,
    deploy_input=0,
    max_deploy_input=224,
    description=f"ImageNet-style torchvision {torchvision.__version__} models (tv:NAME)",
))
