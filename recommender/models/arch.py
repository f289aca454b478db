"""PLACEHOLDER, owned by the model-catalog work: replaced by the real ArchConfig."""
from __future__ import annotations
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ArchConfig:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchConfig":
        return cls(**data)

    def describe(self) -> str:
        return "baseline"
