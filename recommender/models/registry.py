"""The model-family registry (the timm / torchvision ``_api.py`` pattern).

A :class:`ModelFamily` declares how to build its models and what applies to them: the model
names it builds, its builder, its bundled search space and presets, the :class:`ArchConfig`
fields (techniques) that may differ from their defaults, the input sizes it accepts and whether
it is a CIFAR-style (32 px, paper) or an ImageNet-style network. Every place that needs to know
something about a model asks the registry (:func:`get_family`); nothing decides a family by the
spelling of a name. A family registers itself where it is defined::

    register_family(ModelFamily(name="cifar-vgg", models=("vgg11", ...), build=build_vgg, ...))

Models may also come from outside: :func:`register_module` turns a user's ``nn.Module`` into a
one-model family (name ``custom:<Class>-<hash>``) keyed by a hash of its architecture and initial
state, and :func:`resolve_model` accepts ``package.module:factory`` (a callable returning an
``nn.Module``; this imports user code, as every plugin system does).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ArchError, RecommenderError, UnknownNameError
from .arch import ArchConfig

__all__ = ["ModelFamily", "register_family", "get_family", "list_families", "list_models",
           "register_module", "resolve_model", "is_registered", "model_hash"]

Builder = Callable[[str, ArchConfig, int], nn.Module]
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class ModelFamily:
    """A registered family of models.

    Args:
        name: family name (``cifar-resnet``, ``cifar-vgg``, ``torchvision``, ``custom:...``).
        models: the model names it builds (each name belongs to one family).
        build: ``build(model, arch, num_classes) -> nn.Module`` (untrained, the family's init).
        space: bundled search-space file (``recommender.search_spaces`` resource) or None for
            the generic pruning x quantization space.
        presets: bundled preset file (``presets/<file>``) or None.
        techniques: ArchConfig fields that may differ from their defaults for this family;
            ``techniques_for`` narrows it per model.
        style: ``cifar`` (3x3 stride-1 stem, 32 px, the paper's networks), ``imagenet``
            (torchvision's own stems and heads) or ``custom``.
        min_input: smallest input side in px the models run at.
        deploy_input: side in px at which costs (FLOPs, size, latency) are measured; 0 = the
            dataset's native size clamped to [min_input, max_deploy_input].
        max_deploy_input: cap of the native size when ``deploy_input`` is 0.
        identity: extra cache identity (hash of a user module's architecture and initial state).
        description: one line for listings.
        per_model_techniques: model -> techniques, where they differ from ``techniques``.
        stages: names of the modules whose outputs are the stage boundaries, shared by every
            architecture of the family (block-wise distillation matches a rewrite's stages to
            the trained baseline's there); empty: no block-wise distillation.
    """

    name: str
    models: tuple[str, ...]
    build: Builder
    space: str | None = None
    presets: str | None = None
    techniques: frozenset[str] = frozenset()
    style: str = "cifar"
    min_input: int = 8
    deploy_input: int = 32
    max_deploy_input: int = 224
    identity: str = ""
    description: str = ""
    per_model_techniques: dict[str, frozenset[str]] = field(default_factory=dict)
    stages: tuple[str, ...] = ()

    def techniques_for(self, model: str) -> frozenset[str]:
        """ArchConfig fields that may differ from their defaults for ``model``."""
        return self.per_model_techniques.get(model, self.techniques)

    def deploy_size(self, native: int) -> int:
        """Input side (px) at which a model of this family is measured for a dataset whose
        images are ``native`` px."""
        if self.deploy_input:
            return self.deploy_input
        return int(min(max(native, self.min_input), self.max_deploy_input))

    def check_arch(self, model: str, arch: ArchConfig) -> None:
        """Raise :class:`ArchError` when ``arch`` changes a field this model does not support."""
        allowed = self.techniques_for(model)
        default = ArchConfig()
        bad = [f for f in default.to_dict() if getattr(arch, f) != getattr(default, f) and f not in allowed]
        if bad:
            what = ", ".join(sorted(allowed)) or "none"
            raise ArchError(f"{model} ({self.name}) does not support {', '.join(bad)}; "
                            f"architecture settings it supports: {what}")


_FAMILIES: dict[str, ModelFamily] = {}
_MODELS: dict[str, str] = {}  # model name -> family name


def register_family(family: ModelFamily) -> ModelFamily:
    """Register ``family`` (idempotent for the same family; a model name may not be taken twice)."""
    for m in family.models:
        owner = _MODELS.get(m)
        if owner is not None and owner != family.name:
            raise RecommenderError(f"model {m!r} is already registered by family {owner!r}")
    _FAMILIES[family.name] = family
    for m in family.models:
        _MODELS[m] = family.name
    return family


def _ensure_builtin() -> None:
    # The built-in families register themselves on import.
    from . import resnet, torchvision_models, vgg  # noqa: F401


def list_families() -> list[str]:
    """Registered family names."""
    _ensure_builtin()
    return list(_FAMILIES)


def list_models(family: str | None = None) -> list[str]:
    """Registered model names (of one family when ``family`` is given); user modules excluded."""
    _ensure_builtin()
    out = []
    for name, fam in _FAMILIES.items():
        if (family is None and fam.style != "custom") or name == family:
            out.extend(fam.models)
    return out


def get_family(model: str) -> ModelFamily:
    """The family that builds ``model``; an unknown name is an :class:`UnknownNameError`."""
    _ensure_builtin()
    name = _MODELS.get(model)
    if name is None:
        ns, sep, _ = model.partition(":")
        spaced = [m for m in list_models() if sep and m.startswith(ns + ":")]
        raise UnknownNameError("model", model, spaced or list_models())
    return _FAMILIES[name]


# --- user modules -----------------------------------------------------------------------------

def model_hash(module: nn.Module) -> str:
    """16 hex of sha256 over the module's architecture (its repr) and its state (names, shapes,
    dtypes and values): two modules hash alike only when they build the same network with the
    same initial weights."""
    h = hashlib.sha256(repr(module).encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(repr((tuple(v.shape), str(v.dtype))).encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def register_module(module: nn.Module, name: str | None = None, *, min_input: int = 8,
                    deploy_input: int = 0) -> str:
    """Register a user's ``nn.Module`` as a one-model family and return its model name.

    The family builds deep copies of the module as it is now (its architecture and initial
    weights); it supports no architecture technique, so its search space is pruning x
    quantization. The name is ``custom:<Class>-<hash>`` so that the weights cache and a resumed
    study key it by what it is, not by what it is called.
    """
    if not isinstance(module, nn.Module):
        raise RecommenderError(f"model must be a registered name or an nn.Module, got {type(module).__name__}")
    digest = model_hash(module)
    model = name or f"custom:{type(module).__name__}-{digest[:8]}"
    frozen = copy.deepcopy(module).cpu()

    def build(_: str, arch: ArchConfig, num_classes: int) -> nn.Module:
        fam.check_arch(model, arch)
        return copy.deepcopy(frozen)

    fam = ModelFamily(name=model, models=(model,), build=build, style="custom", min_input=min_input,
                      deploy_input=deploy_input, identity=digest,
                      description=f"user module {type(module).__name__}")
    _FAMILIES.pop(model, None)
    _MODELS.pop(model, None)
    return register_family(fam).models[0]


def _import_factory(spec: str) -> Callable[..., Any]:
    mod_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # `recommend` is a console script: let it import the user's code from here
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(mod_name)
    except SystemExit as exc:  # a module that exits at import: not the command's exit
        raise RecommenderError(f"cannot import {mod_name!r} for --model {spec}: it called exit({exc.code!r})") from None
    except Exception as exc:  # ImportError, or the user's module failing at import
        raise RecommenderError(f"cannot import {mod_name!r} for --model {spec}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise RecommenderError(f"{mod_name} has no callable {attr!r} (--model {spec})")
    return fn


def is_registered(model: str) -> bool:
    """Whether ``model`` is a registered model name."""
    _ensure_builtin()
    return isinstance(model, str) and model in _MODELS


def resolve_model(model: str | nn.Module, num_classes: int | None = None, seed: int = 0,
                  check_only: bool = False) -> str:
    """A registered model name for ``model``: a registered name as it is, an ``nn.Module``
    (registered with :func:`register_module`), or ``package.module:factory`` (imported and
    called under ``seed``, with ``num_classes=`` when it takes that argument, so the same
    command builds the same initial weights and resumes the same study). ``check_only``: only
    check the form (an unknown plain name is an :class:`UnknownNameError`), import nothing."""
    if isinstance(model, nn.Module):
        return register_module(model)
    if not isinstance(model, str):
        raise RecommenderError(f"model must be a name or an nn.Module, got {type(model).__name__}")
    _ensure_builtin()
    if model in _MODELS:
        return model
    ns = model.partition(":")[0]
    if ":" in model and any(m.startswith(ns + ":") for m in list_models()):
        get_family(model)  # an unknown name in a registered namespace: list that namespace
    if not _FACTORY.fullmatch(model):
        get_family(model)  # raises UnknownNameError with the valid names
    if check_only:
        return model
    fn = _import_factory(model)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = fn(num_classes=num_classes) if num_classes and "num_classes" in params else fn()
    except SystemExit as exc:  # the factory exited (builtins:exit): not the command's exit
        raise RecommenderError(f"--model {model}: the factory called exit({exc.code!r}) instead of returning "
                               "an nn.Module") from None
    except Exception as exc:
        raise RecommenderError(f"--model {model}: the factory failed: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(net, nn.Module):
        raise RecommenderError(f"--model {model}: the factory returned {type(net).__name__}, not an nn.Module")
    return register_module(net)
