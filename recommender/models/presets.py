"""The paper's variants as named ArchConfig presets, loaded from the bundled preset files.

Each registered family may name a preset file (``search_spaces/presets/<file>.yaml``, shipped as
package data). A file holds ``presets:``, a list of entries with ``name``, ``model`` (the paper's
base model), ``description`` and ``arch`` (ArchConfig fields; omitted fields take their
defaults). A preset applies to every depth of its family
(``build_model("resnet50", "paper-resnet101-11")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import yaml

from ..errors import ArchError, RecommenderError, UnknownNameError
from ..resources import bundled
from .arch import ArchConfig
from .registry import _FAMILIES, _ensure_builtin, get_family


@dataclass(frozen=True)
class Preset:
    """A named ArchConfig of a family: ``model`` is the base model it was published for."""

    name: str
    model: str
    arch: ArchConfig
    description: str = ""
    family: str = ""


def parse_presets(text: str, family: str, source: str) -> dict[str, Preset]:
    """Presets of one YAML document (``presets:`` list); any problem is one RecommenderError line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecommenderError(f"cannot read presets {source}: {str(exc).splitlines()[0]}") from None
    entries = data.get("presets") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise RecommenderError(f"{source}: expected a mapping with a 'presets' list")
    out: dict[str, Preset] = {}
    for entry in entries:
        if not isinstance(entry, dict) or "name" not in entry or "model" not in entry:
            raise RecommenderError(f"{source}: each preset needs 'name' and 'model': {entry!r}")
        name = str(entry["name"])
        if name in out:
            raise RecommenderError(f"{source}: duplicate preset {name!r}")
        unknown = set(entry) - {"name", "model", "description", "arch"}
        if unknown:
            raise RecommenderError(f"{source}: preset {name!r} has unknown keys {sorted(unknown)}")
        try:
            arch = ArchConfig.from_dict(entry.get("arch") or {})
        except ArchError as exc:
            raise RecommenderError(f"{source}: preset {name!r}: {exc}") from None
        out[name] = Preset(name, str(entry["model"]), arch,
                           " ".join(str(entry.get("description", "")).split()), family)
    return out


@lru_cache(maxsize=None)
def _family_presets(family: str, file: str) -> dict[str, Preset]:
    node = bundled("presets", file)
    try:
        text = node.read_text()
    except OSError as exc:
        raise RecommenderError(f"cannot read presets {file}: {exc.strerror}") from None
    return parse_presets(text, family, f"presets/{file}")


def all_presets() -> dict[str, Preset]:
    """Every preset of every registered family, by name."""
    _ensure_builtin()
    out: dict[str, Preset] = {}
    for fam in list(_FAMILIES.values()):
        if fam.presets:
            for name, p in _family_presets(fam.name, fam.presets).items():
                if name in out:
                    raise RecommenderError(f"preset {name!r} is defined by two families")
                out[name] = p
    return out


def list_presets(model: str | None = None) -> list[str]:
    """Preset names; with ``model``, those of its family (a preset applies to every depth)."""
    presets = all_presets()
    if model is None:
        return list(presets)
    fam = get_family(model)
    return [n for n, p in presets.items() if p.family == fam.name]


def get_preset(name: str) -> Preset:
    presets = all_presets()
    if name not in presets:
        raise UnknownNameError("preset", name, list(presets))
    return presets[name]
