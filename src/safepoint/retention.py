"""Retention policy: which committed checkpoints stay.

A policy only chooses; the manager deletes, and only after a new checkpoint has been
committed. Whatever the policy says, the newest committed checkpoint and the best one
are never deleted. Order comes from the manifest's ``seq``, never from names or mtimes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from safepoint.checkpoint import Checkpoint
from safepoint.errors import ConfigError
from safepoint.monitor import metric_value


def _check(name: str, value: int | None, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"Invalid retention setting. Expected {name}=None or an integer >= {minimum}. "
            f"Received: {name}={value!r}."
        )


@dataclass(frozen=True)
class Keep:
    """Keep the ``last`` newest, the ``best`` best by the monitored metric, and every
    checkpoint whose step is a multiple of ``every``. Pass ``keep=None`` to the manager
    to keep everything."""

    last: int | None = None
    best: int | None = None
    every: int | None = None

    def __post_init__(self) -> None:
        _check("last", self.last, 1)
        _check("best", self.best, 1)
        _check("every", self.every, 1)
        if self.last is None and self.best is None and self.every is None:
            raise ConfigError(
                "Keep() needs at least one of last=, best= or every=. Received: none. Pass "
                "keep=None to the manager to keep every checkpoint."
            )

    def select(
        self, checkpoints: Sequence[Checkpoint], *, monitor: str | None, mode: str | None
    ) -> set[str]:
        """Names to keep among ``checkpoints`` (ordered oldest first by seq)."""
        ordered = sorted(checkpoints, key=lambda c: c.seq)
        keep: set[str] = set()
        if ordered:
            keep.add(ordered[-1].name)  # the newest is never deleted
        if self.last:
            keep.update(c.name for c in ordered[-self.last :])
        if self.every:
            keep.update(c.name for c in ordered if c.step is not None and c.step % self.every == 0)
        ranked = rank_best(ordered, monitor=monitor, mode=mode)
        keep.update(c.name for c in ranked[: max(self.best or 0, 1)])  # best is never deleted
        return keep


def rank_best(
    checkpoints: Sequence[Checkpoint], *, monitor: str | None, mode: str | None
) -> list[Checkpoint]:
    """Checkpoints with a finite monitored value, best first (earliest wins ties)."""
    if monitor is None or mode is None:
        return []
    scored = [(metric_value(c.metrics, monitor), c) for c in checkpoints]
    valid = [(v, c) for v, c in scored if v is not None]
    sign = 1.0 if mode == "min" else -1.0
    valid.sort(key=lambda vc: (sign * vc[0], vc[1].seq))
    return [c for _, c in valid]


__all__ = ["Keep", "rank_best"]
