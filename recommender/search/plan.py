"""How a study answers its question, resolved once: the rungs with their protocols, promotion,
sampler, worker processes, trial target and time budget.

:class:`Plan` is frozen and built once per process by :class:`~recommender.search.study.Search`
when the data is known (the ladder's resolutions depend on the data's native size); the search
only reads it, and its rungs are stored on the study (``rungs``) for the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .rungs import PromotionPolicy, Rung

__all__ = ["Plan"]


@dataclass(frozen=True)
class Plan:
    """The resolved plan of a study.

    Args:
        rungs: the ladder, lowest first, every rung's protocol resolved (rung 0: the search's).
        policy: how many candidates go up a rung.
        jobs: worker processes on this machine (1: this process).
        sampler: ``tpe``, ``nsga2``, ``gp`` or ``random``.
        structure_policy: ``resample`` or ``constraint``.
        trials: candidates the study should have evaluated.
        timeout: seconds for this invocation (None: no limit).
        pinned_resolution: px every rung runs at (a given checkpoint's size; 0: each rung's own).
        note: why ``--rungs auto`` added no promotion rung (empty: it did, or was not asked).
    """

    rungs: tuple[Rung, ...]
    policy: PromotionPolicy
    jobs: int
    sampler: str
    structure_policy: str
    trials: int
    timeout: float | None = None
    pinned_resolution: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"rungs": [r.to_dict() for r in self.rungs], "jobs": self.jobs, "sampler": self.sampler,
                "structure_policy": self.structure_policy, "trials": self.trials, "timeout": self.timeout,
                "pinned_resolution": self.pinned_resolution, "note": self.note,
                "promotion": {"fraction": self.policy.fraction, "min": self.policy.min_promoted,
                              "max": self.policy.max_promoted, "epoch_factor": self.policy.epoch_factor}}
