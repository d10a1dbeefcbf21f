"""Retention and deletion of a manager's checkpoints: what goes, and how it is recorded.

Retention considers only the manager's own series (:func:`safepoint.catalog.series.member`)
and runs under the root's save mutex, so a checkpoint another manager of the process
is committing is never judged half-listed. Each deletion is crash-safe
(``Storage.remove``: a marked trash entry, then removal) and logged.
"""

from __future__ import annotations

from safepoint.catalog.index import Catalog
from safepoint.catalog.series import member, serial
from safepoint.checkpoint import Checkpoint
from safepoint.manager.history import History
from safepoint.ondisk.template import NameTemplate
from safepoint.retention import Keep


class Pruner:
    """Prunes the series of ``template`` in ``catalog``'s root, logging to ``history``."""

    def __init__(self, catalog: Catalog, template: NameTemplate, history: History) -> None:
        self.catalog = catalog
        self.template = template
        self.history = history

    def in_series(self, ckpt: Checkpoint) -> bool:
        return member(self.catalog, self.template, ckpt.name)

    def apply(self, keep: Keep | None, *, monitor: str | None, mode: str | None) -> None:
        """Delete the checkpoints of the series that ``keep`` does not select."""
        if keep is None:
            return
        with serial(self.catalog.storage):
            current = [c for c in self.catalog.checkpoints() if self.in_series(c)]
            kept = keep.select(current, monitor=monitor, mode=mode)
            for ckpt in current:
                if ckpt.name not in kept:
                    self.remove(ckpt, "retention")

    def remove(self, ckpt: Checkpoint, reason: str) -> None:
        """Delete ``ckpt`` (the caller holds the writer lock) and log it with ``reason``."""
        self.catalog.storage.remove(ckpt.name)
        self.catalog.forget(ckpt.name)
        self.history.record(
            "delete",
            name=ckpt.name,
            seq=ckpt.seq,
            step=ckpt.step,
            metrics=ckpt.metrics,
            reason=reason,
        )


__all__ = ["Pruner"]
