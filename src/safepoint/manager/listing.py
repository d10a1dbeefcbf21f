"""The read-only half of ``CheckpointManager``: what is committed, which is best, and
whether it verifies. Everything here is derived from the root (the manifests), so a
restarted process or a reader elsewhere sees the same answers."""

from __future__ import annotations

from safepoint.catalog.index import Catalog
from safepoint.checkpoint import Checkpoint, Verification
from safepoint.manager.pruning import Pruner
from safepoint.monitor import metric_value
from safepoint.retention import rank_best


class Listing:
    """Listing, "best" and verification for :class:`safepoint.CheckpointManager`."""

    catalog: Catalog
    monitor: str | None
    mode: str | None
    _pruner: Pruner

    def checkpoints(self) -> list[Checkpoint]:
        """Committed checkpoints, oldest first (by the manifest's ``seq``)."""
        return self.catalog.checkpoints()

    def latest(self) -> Checkpoint | None:
        """The newest committed checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def best(self) -> Checkpoint | None:
        """The committed checkpoint with the best monitored metric, or None."""
        ranked = rank_best(self.checkpoints(), monitor=self.monitor, mode=self.mode)
        return ranked[0] if ranked else None

    def in_series(self, ckpt: Checkpoint) -> bool:
        """True when ``ckpt`` was written by a manager with this name template."""
        return self._pruner.in_series(ckpt)

    def verify(self) -> list[Verification]:
        """Check every checkpoint's manifest, sizes and checksums."""
        return self.catalog.verify()

    def metric(self, ckpt: Checkpoint) -> float | None:
        """The monitored metric of ``ckpt`` as a finite float (None if absent or NaN)."""
        return None if self.monitor is None else metric_value(ckpt.metrics, self.monitor)


__all__ = ["Listing"]
