"""Upper bounds of every count a user or a file can set, in one table.

A count without a bound is a way to make the tool work forever or fill the memory (a recipe
asking for 1e9 fine-tuning steps, ``--rungs 50`` with 3**49 times the epochs on its top rung,
``--jobs 1000000``). Each entry of :data:`LIMITS` names where the count is set, its allowed
range and why the bound is where it is; the validators of the command, the API, the recipe and
search-space loaders and the config dataclasses read it through :func:`check`, before any work
starts, and the README's table of bounds is checked against it (tests/test_limits.py). This
module imports neither torch nor optuna.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import RecommenderError

__all__ = ["Limit", "LIMITS", "check", "limit", "markdown_table"]


@dataclass(frozen=True)
class Limit:
    """One bounded count: ``where`` it is set (a flag, a field), its range [``low``, ``high``]
    in ``unit``, and ``why`` the upper bound is there."""

    where: str
    low: int
    high: int
    unit: str
    why: str


#: name -> Limit. Names are what validators ask for; ``where`` is what a user reads.
LIMITS: dict[str, Limit] = {name: lim for name, lim in [
    ("trials", Limit("--trials", 1, 10_000, "trials",
                     "each trial trains a network: 10,000 proxy trainings are weeks of CPU time")),
    ("jobs", Limit("--jobs", 1, 64, "processes",
                   "each worker holds the data and a model; beyond the machine's cores they only slow each other")),
    ("threads", Limit("--threads", 0, 1024, "threads", "CPU threads of one process (0: the CPUs it may use)")),
    ("rungs", Limit("--rungs", 1, 5, "rungs",
                    "each derived rung trains 3x the epochs of the one below: the 5th trains 81x the search's")),
    ("max_promoted", Limit("--max-promoted", 1, 64, "candidates", "each promoted candidate is a longer training")),
    ("n_confirm", Limit("--n-confirm", 0, 64, "candidates", "each re-checked candidate is a longer training")),
    ("image_size", Limit("--image-size", 4, 1024, "px",
                         "decoded images and activations grow with the square of the side")),
    ("epochs", Limit("apply --epochs", 1, 10_000, "epochs", "training length of one network")),
    ("num_classes", Limit("--num-classes, from_datasets(num_classes=)", 2, 100_000, "classes",
                          "the classifier's width (ImageNet-21k has 21,841 classes); one class is no classifier")),
    ("seed", Limit("--seed", 0, 2**31 - 1, "", "seeds feed numpy (< 2**32) and the confirm rung adds one")),
    ("port", Limit("dashboard --port", 0, 65_535, "", "a TCP port (0 picks a free one)")),
    ("timeout", Limit("--timeout, --max-trial-time", 0, 30 * 86_400, "s", "30 days")),
    ("heartbeat", Limit("--heartbeat", 1, 3_600, "s",
                        "a running trial's heartbeat interval; other workers wait for it to go stale")),
    ("grace", Limit("--grace", 1, 86_400, "s", "how long a silent trial is still considered alive")),
    ("finetune_steps", Limit("recipe prune.finetune_steps", 0, 100_000, "steps",
                             "optimiser steps of recovery training per pruning round")),
    ("calibration_batches", Limit("recipe quant.calibration_batches", 1, 1_000, "batches",
                                  "int8-static calibration keeps every batch in memory")),
    ("width", Limit("recipe arch widths (stem_width, widths, inner, inner_first, last_width, pre_gap)", 0,
                    16_384, "channels", "a 16,384-wide 3x3 conv alone holds 2.4 G parameters")),
    ("groups", Limit("recipe arch groups", 1, 1_024, "groups", "grouped convs need at least one channel per group")),
    ("recipe_bytes", Limit("recipe.json size", 0, 1_048_576, "bytes", "a recipe is a few hundred bytes")),
    ("recipe_depth", Limit("recipe.json nesting", 0, 32, "levels", "a recipe nests 3 levels deep")),
    ("space_bytes", Limit("--space file size", 0, 1_048_576, "bytes", "a search space is a few kB")),
    ("space_nodes", Limit("--space YAML nodes (aliases expanded)", 0, 100_000, "nodes",
                          "a YAML alias can repeat a subtree: a few lines can expand to billions of nodes")),
    ("space_dimensions", Limit("--space dimensions", 0, 256, "dimensions", "every draft suggests each one")),
    ("space_choices", Limit("--space choices of one dimension", 1, 1_000, "choices",
                            "the sampler models each choice")),
]}


def limit(name: str) -> Limit:
    """The :class:`Limit` called ``name``."""
    return LIMITS[name]


def check(name: str, value: Any, what: str | None = None, *, error: type[RecommenderError] = RecommenderError,
          integer: bool = True) -> Any:
    """``value`` if it is an integer (a finite number without ``integer``) within the limit
    ``name``, else a one-line ``error`` naming ``what`` (default: where the limit is set)."""
    lim = LIMITS[name]
    label = what or lim.where
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral) if integer else (
        isinstance(value, numbers.Real) and math.isfinite(value))
    unit = f" {lim.unit}" if lim.unit else ""
    if isinstance(value, bool) or not ok_type or not lim.low <= value <= lim.high:
        raise error(f"{label} must be {kind} in [{lim.low}, {lim.high}]{unit} ({lim.why}), got {value!r}")
    return value


def markdown_table() -> str:
    """The README's table of bounds (tests/test_limits.py checks that the README holds it)."""
    rows = ["| where it is set | allowed | why |", "|---|---|---|"]
    for lim in LIMITS.values():
        unit = f" {lim.unit}" if lim.unit else ""
        rows.append(f"| {lim.where} | {lim.low} to {lim.high:,}{unit} | {lim.why} |")
    return "\n".join(rows)
