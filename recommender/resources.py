"""The package data: bundled search spaces and preset files (``recommender.search_spaces``).

They live in the repository's top-level ``search_spaces/`` folder and ship inside the package
(``pyproject.toml`` maps that folder to the ``recommender.search_spaces`` package), so an editable
install and a wheel read the same files through :mod:`importlib.resources`.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

__all__ = ["bundled", "bundled_names"]

PACKAGE = "recommender.search_spaces"


def bundled(*parts: str) -> Traversable:
    """A bundled file, e.g. ``bundled("presets", "resnet101.yaml")``."""
    node = resources.files(PACKAGE)
    for p in parts:
        node = node / p
    return node


def bundled_names(*parts: str, suffix: str = ".yaml") -> list[str]:
    """Names of the bundled files in a folder (``bundled_names("presets")``)."""
    folder = bundled(*parts)
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(suffix))
