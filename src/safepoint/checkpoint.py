"""``Checkpoint``: the value type describing one committed checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint as listed from its manifest.

    ``state`` is filled only on the object a restore returns: the loaded state tree
    (tensors as numpy arrays or torch tensors, as they were saved).
    """

    name: str
    path: str
    step: int | None
    epoch: int | None
    metrics: dict[str, Any]
    created: float
    seq: int
    state: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Verification:
    """The outcome of verifying one checkpoint: ``error`` is None when it is sound."""

    name: str
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


__all__ = ["Checkpoint", "Verification"]
