"""recommender: a constraint-driven compression recommender for convolutional networks.

Public API (imported lazily, so ``import recommender`` is cheap)::

    from recommender import recommend, build_model, list_models, list_presets
    rec = recommend(model="resnet101", max_drop="2%", budgets=["5M-params"])
    print(rec.explain()); model = rec.load_model() if rec.feasible else None
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "recommend": "recommender.api",
    "show": "recommender.api",
    "apply_recipe": "recommender.api",
    "Recommendation": "recommender.report",
    "Recipe": "recommender.recipe",
    "PruneConfig": "recommender.recipe",
    "QuantConfig": "recommender.recipe",
    "load_recipe": "recommender.recipe",
    "ArchConfig": "recommender.models.arch",
    "build_model": "recommender.models",
    "list_models": "recommender.models",
    "list_presets": "recommender.models",
    "get_preset": "recommender.models",
    "Budget": "recommender.constraints",
    "MaxDrop": "recommender.constraints",
    "ProxyProtocol": "recommender.protocol",
    "get_protocol": "recommender.protocol",
    "load_dataset": "recommender.data",
    "from_datasets": "recommender.data",
    "RecommenderError": "recommender.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        mod = importlib.import_module(_EXPORTS[name])
        value = getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'recommender' has no attribute {name!r}")
