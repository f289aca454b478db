"""Model catalog: registered model families, technique blocks and the paper's presets.

``build_model(model, arch=None, num_classes=10)`` builds a registered model (see
:func:`list_models`; ``create_model`` is the same function under timm's name) with the techniques
of ``arch`` (an :class:`ArchConfig`, a preset name from :func:`list_presets`, or None for the
unmodified base model). Families: the paper's CIFAR ResNets and VGGs (``resnet101``,
``vgg19_bn``, ...), torchvision's ImageNet-style models (``tv:mobilenet_v2``, ...) and a user's
own modules (:func:`register_module`, :func:`resolve_model`).
"""

from __future__ import annotations

from torch import nn

from ..errors import ArchError
from .arch import ArchConfig
from .presets import Preset, get_preset, list_presets
from .registry import (ModelFamily, get_family, list_families, list_models, model_hash, register_family,
                       register_module, resolve_model)

__all__ = ["ArchConfig", "ModelFamily", "Preset", "build_model", "create_model", "get_family", "get_preset",
           "list_families", "list_models", "list_presets", "model_hash", "register_family",
           "register_module", "resolve_arch", "resolve_model"]


def resolve_arch(model: str, arch: ArchConfig | str | dict | None) -> ArchConfig:
    """ArchConfig for ``arch`` given as a config, a preset name, a dict or None (the base model)."""
    if arch is None:
        return ArchConfig()
    if isinstance(arch, ArchConfig):
        return arch
    if isinstance(arch, str):
        preset = get_preset(arch)
        fam = get_family(model)
        if preset.family != fam.name:
            raise ArchError(f"preset {arch!r} is for {preset.family} models, not {model} ({fam.name})")
        return preset.arch
    if isinstance(arch, dict):
        return ArchConfig.from_dict(arch)
    raise ArchError(f"arch must be an ArchConfig, a preset name or None, got {type(arch).__name__}")


def build_model(model: str, arch: ArchConfig | str | None = None, num_classes: int = 10) -> nn.Module:
    """Build the registered ``model`` with ``num_classes`` outputs and ``arch`` applied (untrained).

    Unknown model or preset -> :class:`UnknownNameError`; a technique that cannot apply to the
    model -> :class:`ArchError`. CIFAR families expect 3x32x32 inputs (they run at 8..64 px);
    ImageNet-style ones run at 32 px and more.
    """
    fam = get_family(model)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ArchError(f"num_classes must be a positive integer, got {num_classes!r}")
    return fam.build(model, resolve_arch(model, arch), num_classes)


create_model = build_model
