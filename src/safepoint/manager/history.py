"""A manager's records in the run log: its saves, its deletions and its skipped saves.

Every record is best effort (:func:`safepoint.storage.runlog.note`): the log is
informational, and a committed checkpoint must never be reported as failed because its
log line was not written. Skips are coalesced (:class:`~safepoint.storage.runlog.SkipSummary`)
and the pending summary is written before the next save or deletion record, so the
log stays in order.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from safepoint.errors import SafepointError
from safepoint.storage import runlog
from safepoint.storage.protocol import Storage

log = logging.getLogger("safepoint")


class History:
    """The run-log writer of one manager (series ``series`` in ``storage``'s root)."""

    def __init__(self, storage: Storage, series: str, *, enabled: bool = True) -> None:
        self._storage = storage
        self._series = series
        self._enabled = enabled  # False: a root that must hold nothing but checkpoints
        self._skips: runlog.SkipSummary | None = None

    def record(self, event: str, **fields: Any) -> None:
        """Append a save or deletion record (after the pending skip summary)."""
        if not self._enabled:
            return
        self.flush()
        runlog.note(self._storage, event, **fields)

    def skip(
        self, *, step: int | None, epoch: int | None, metrics: dict[str, Any], reason: str
    ) -> None:
        """Note a skipped save (see ``CheckpointManager.log_skip``)."""
        if not self._enabled:
            return
        skips = self._skips
        if skips is None:
            skips = self._skips = runlog.SkipSummary(self._storage)
            weakref.finalize(self, skips.flush_quietly)
        try:
            skips.add(step=step, epoch=epoch, metrics=metrics, reason=reason, series=self._series)
        except SafepointError as exc:
            log.warning("safepoint: could not write the run log (skip): %s", exc)

    def flush(self) -> None:
        """Write the pending skip summary, if any."""
        if self._skips is not None:
            self._skips.flush_quietly()


__all__ = ["History"]
