"""The recipe: what the recommender recommends.

A :class:`Recipe` is an :class:`~recommender.models.arch.ArchConfig` (architecture techniques)
and one registered compression method per stage (pruning, then quantization). Applied to a base model name and a class count
it builds a model deterministically. Recipes round-trip through JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compress.methods import STAGES, MethodConfig, make_config
from .errors import CheckpointError, RecommenderError
from .models.arch import ArchConfig

_UNSET: Any = object()


def _given(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not _UNSET}


def PruneConfig(method: str = "none", sparsity: Any = _UNSET, importance: Any = _UNSET, step: Any = _UNSET,
                finetune_steps: Any = _UNSET) -> MethodConfig:
    """The pruning stage's config for a registered method (``none``, ``unstructured-l1`` (the
    paper: iterative global L1 magnitude pruning of conv weights), ``structured-channel``
    (torch-pruning removes whole channels)): see each method's config dataclass for its options."""
    return make_config("prune", {"method": method, **_own("prune", method, _given(
        sparsity=sparsity, importance=importance, step=step, finetune_steps=finetune_steps))})


def QuantConfig(scheme: str = "fp32", engine: Any = _UNSET, calibration_batches: Any = _UNSET,
                observer: Any = _UNSET, per_channel: Any = _UNSET, keep_float: Any = _UNSET,
                qat_epochs: Any = _UNSET) -> MethodConfig:
    """The quantization stage's config for a registered scheme (``fp32``, ``fp16``,
    ``int8-dynamic``, ``int8-static``): see each scheme's config dataclass for its options."""
    return make_config("quant", {"scheme": scheme, **_own("quant", scheme, _given(
        engine=engine, calibration_batches=calibration_batches, observer=observer, per_channel=per_channel,
        keep_float=keep_float, qat_epochs=qat_epochs))})


def _own(stage: str, method: str, kw: dict[str, Any]) -> dict[str, Any]:
    # Like the single config class these replace, the convenience constructors take every
    # option of the stage and keep the ones the chosen method has (recipe files stay strict).
    from dataclasses import fields

    from .compress.methods import get_method

    own = {f.name for f in fields(get_method(stage, method).config)}
    return {k: v for k, v in kw.items() if k in own}


@dataclass(frozen=True)
class Recipe:
    """Architecture + pruning + quantization, applied in that order to a base model.

    ``prune`` and ``quant`` are configs of registered compression methods
    (:mod:`recommender.compress.methods`); their dict form names the method (``method`` /
    ``scheme``) and its options.
    """

    arch: ArchConfig = field(default_factory=ArchConfig)
    prune: MethodConfig = field(default_factory=PruneConfig)
    quant: MethodConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        for stage in STAGES:
            value = getattr(self, stage)
            if isinstance(value, dict) or value is None:
                object.__setattr__(self, stage, make_config(stage, value))
            elif not isinstance(value, MethodConfig) or value.stage != stage:
                raise RecommenderError(f"recipe {stage} must be a {stage} method config or a dict, "
                                       f"got {type(value).__name__}")

    def stages(self) -> list[MethodConfig]:
        """The compression stages in the order they are applied."""
        return [getattr(self, s) for s in STAGES]

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch.to_dict(), **{s: getattr(self, s).to_dict() for s in STAGES}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        if not isinstance(data, dict):
            raise CheckpointError("a recipe must be a JSON object with arch, prune and quant")
        unknown = set(data) - {"arch", *STAGES}
        if unknown:
            raise CheckpointError(f"invalid recipe: unknown sections {sorted(unknown)}")
        try:
            parts = {}
            for stage in STAGES:
                body = data.get(stage) or {}
                if not isinstance(body, dict):
                    raise TypeError(f"{stage} must be an object")
                parts[stage] = make_config(stage, body)
            arch = data.get("arch") or {}
            if not isinstance(arch, dict):
                raise TypeError("arch must be an object")
            return cls(arch=ArchConfig.from_dict(arch), **parts)
        except (TypeError, ValueError, RecommenderError) as exc:
            raise CheckpointError(f"invalid recipe: {exc}") from None

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"recipe is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def describe(self) -> str:
        """One line for tables: ``arch + prune + quant``."""
        return " + ".join([self.arch.describe(), self.prune.describe(), self.quant.describe()])


def load_recipe(path: str | Path) -> tuple[str | None, int | None, Recipe]:
    """Read a recipe file written by the recommender.

    The file is JSON: either a bare recipe or ``{"model": ..., "num_classes": ..., "recipe": {...}}``.
    Returns (model name or None, class count or None, recipe).
    """
    data = read_recipe_file(path)
    if isinstance(data, dict) and "recipe" in data:
        return data.get("model"), data.get("num_classes"), Recipe.from_dict(data["recipe"])
    return None, None, Recipe.from_dict(data)


def read_recipe_file(path: str | Path) -> Any:
    """The JSON of a recipe file, within the size and nesting limits (:mod:`recommender.limits`);
    anything else is a one-line :class:`CheckpointError`."""
    from . import limits
    from .io import read_text

    p = Path(path)
    text = read_text(p, "recipe", "recipe_bytes", error=CheckpointError)
    depth_limit = limits.limit("recipe_depth").high
    if _nesting(text) > depth_limit:
        raise CheckpointError(f"recipe {p} nests deeper than {depth_limit} levels ({limits.limit('recipe_depth').why})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"recipe {p} is not valid JSON: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"recipe {p} nests too deeply") from None


def _nesting(text: str) -> int:
    """The deepest bracket nesting of a JSON text (strings skipped), without parsing it."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest
