"""The paper's variants as named ArchConfig presets, loaded from ``search_spaces/presets/*.yaml``.

Each YAML file holds ``presets:``, a list of entries with ``name``, ``model`` (the paper's base
model), ``description`` and ``arch`` (ArchConfig fields; omitted fields take their defaults).
A preset applies to every depth of its family (``build_model("resnet50", "paper-resnet101-11")``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import ArchError, RecommenderError, UnknownNameError
from .arch import ArchConfig

#: Where the preset files live; ``RECOMMENDER_PRESETS_DIR`` overrides it.
PRESETS_DIR = Path(__file__).resolve().parents[2] / "search_spaces" / "presets"


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    arch: ArchConfig
    description: str = ""

    @property
    def family(self) -> str:
        return family_of(self.model)


def family_of(model: str) -> str:
    """``resnet`` or ``vgg`` for a model name."""
    return "vgg" if model.startswith("vgg") else "resnet"


def presets_dir() -> Path:
    return Path(os.environ.get("RECOMMENDER_PRESETS_DIR") or PRESETS_DIR)


@lru_cache(maxsize=4)
def _load(directory: str) -> dict[str, Preset]:
    path = Path(directory)
    files = sorted(path.glob("*.yaml"))
    if not files:
        raise RecommenderError(f"no preset files (*.yaml) in {path}")
    out: dict[str, Preset] = {}
    for file in files:
        try:
            data = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RecommenderError(f"cannot read presets {file}: {exc}") from None
        entries = data.get("presets") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise RecommenderError(f"{file}: expected a mapping with a 'presets' list")
        for entry in entries:
            if not isinstance(entry, dict) or "name" not in entry or "model" not in entry:
                raise RecommenderError(f"{file}: each preset needs 'name' and 'model': {entry!r}")
            name = str(entry["name"])
            if name in out:
                raise RecommenderError(f"{file}: duplicate preset {name!r}")
            unknown = set(entry) - {"name", "model", "description", "arch"}
            if unknown:
                raise RecommenderError(f"{file}: preset {name!r} has unknown keys {sorted(unknown)}")
            try:
                arch = ArchConfig.from_dict(entry.get("arch") or {})
            except ArchError as exc:
                raise RecommenderError(f"{file}: preset {name!r}: {exc}") from None
            out[name] = Preset(name, str(entry["model"]), arch,
                               " ".join(str(entry.get("description", "")).split()))
    return out


def all_presets() -> dict[str, Preset]:
    return _load(str(presets_dir()))


def list_presets(model: str | None = None) -> list[str]:
    """Preset names; with ``model``, those of its family (a preset applies to every depth)."""
    presets = all_presets()
    if model is None:
        return list(presets)
    from . import list_models  # local: avoid an import cycle

    if model not in list_models():
        raise UnknownNameError("model", model, list_models())
    return [n for n, p in presets.items() if p.family == family_of(model)]


def get_preset(name: str) -> Preset:
    presets = all_presets()
    if name not in presets:
        raise UnknownNameError("preset", name, list(presets))
    return presets[name]
