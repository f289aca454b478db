"""The user's question, parsed once: which network, on which data, within which tolerance and budgets.

:class:`Question` is frozen. The search builds it once (after the data is loaded, when the class
count is known), stores it on the study, and everything that judges a candidate reads its
:attr:`Question.feasibility`; the report rebuilds the same object from storage
(:meth:`Question.from_attrs`), so an answer re-rendered later, elsewhere, judges exactly as the
search did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .constraints import Budget, MaxDrop
from .feasibility import BOUNDARY_SLACK_PP, Feasibility

__all__ = ["Question"]


@dataclass(frozen=True)
class Question:
    """What the user asked.

    Args:
        model: the model as measured (a registered name, e.g. ``resnet101`` or
            ``custom:Net-1a2b3c4d``).
        dataset: the dataset spec (``digits``, ``imagefolder:PATH``, ...).
        feasibility: the tolerance and the budgets (the first budget is the primary cost).
        num_classes: classes of the data (None: unknown, in a study written before it was stored).
        image_size: side (px) images were decoded to (None: the dataset's native size).
    """

    model: str
    dataset: str
    feasibility: Feasibility
    num_classes: int | None = None
    image_size: int | None = None

    @classmethod
    def of(cls, model: str, dataset: str, max_drop: MaxDrop, budgets: Sequence[Budget],
           num_classes: int | None = None, image_size: int | None = None) -> "Question":
        return cls(model, dataset, Feasibility(max_drop, tuple(budgets)), num_classes, image_size)

    @property
    def max_drop(self) -> MaxDrop:
        return self.feasibility.max_drop

    @property
    def budgets(self) -> tuple[Budget, ...]:
        return self.feasibility.budgets

    @property
    def primary(self) -> Budget | None:
        return self.feasibility.primary

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dataset": self.dataset, "num_classes": self.num_classes,
                "image_size": self.image_size, **self.feasibility.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Question":
        md = d.get("max_drop") or {"value": 0.0}
        return cls(str(d.get("model", "?")), str(d.get("dataset", "?")),
                   Feasibility(MaxDrop(**md), tuple(Budget(**b) for b in d.get("budgets", [])),
                               float(d.get("slack_pp", BOUNDARY_SLACK_PP))),
                   d.get("num_classes"), d.get("image_size"))

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "Question":
        """The question a study stored (``question``), or, for a study written before it was
        stored, the one its identity (``spec``) implies."""
        if isinstance(attrs.get("question"), Mapping):
            return cls.from_dict(attrs["question"])
        return cls.from_dict(attrs.get("spec") or {})
