"""Model catalog: CIFAR ResNet / VGG base models, technique blocks and the paper's presets.

``build_model(model, arch=None, num_classes=10)`` builds ``model`` (see :func:`list_models`) for
32x32 inputs with the techniques of ``arch`` (an :class:`ArchConfig`, a preset name from
:func:`list_presets`, or None for the unmodified base model).
"""

from __future__ import annotations

from torch import nn

from ..errors import ArchError, UnknownNameError
from .arch import ArchConfig
from .presets import Preset, family_of, get_preset, list_presets
from .resnet import DEPTHS, build_resnet
from .vgg import CONFIGS, build_vgg

__all__ = ["ArchConfig", "Preset", "build_model", "get_preset", "list_models", "list_presets",
           "resolve_arch"]

_MODELS = [*DEPTHS] + [f"{v}{bn}" for v in CONFIGS for bn in ("", "_bn")]


def list_models() -> list[str]:
    """Supported base models: resnet18/34/50/101/152, vgg11/13/16/19 and their _bn forms."""
    return list(_MODELS)


def resolve_arch(model: str, arch: ArchConfig | str | None) -> ArchConfig:
    """ArchConfig for ``arch`` given as a config, a preset name or None (the base model)."""
    if arch is None:
        return ArchConfig()
    if isinstance(arch, ArchConfig):
        return arch
    if isinstance(arch, str):
        preset = get_preset(arch)
        if preset.family != family_of(model):
            raise ArchError(f"preset {arch!r} is for {preset.family} models, not {model}")
        return preset.arch
    if isinstance(arch, dict):
        return ArchConfig.from_dict(arch)
    raise ArchError(f"arch must be an ArchConfig, a preset name or None, got {type(arch).__name__}")


def build_model(model: str, arch: ArchConfig | str | None = None, num_classes: int = 10) -> nn.Module:
    """Build ``model`` for 3x32x32 inputs and ``num_classes`` classes with ``arch`` applied.

    Unknown model or preset -> :class:`UnknownNameError`; a technique that cannot apply to the
    model -> :class:`ArchError`.
    """
    if model not in _MODELS:
        raise UnknownNameError("model", model, _MODELS)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ArchError(f"num_classes must be a positive integer, got {num_classes!r}")
    cfg = resolve_arch(model, arch)
    if model.startswith("resnet"):
        return build_resnet(model, cfg, num_classes)
    return build_vgg(model, cfg, num_classes)
