"""Preemption during ``fit``: SIGTERM or SIGUSR1 becomes a backup, then an exit.

``BackupAndRestore`` installs a :class:`FitGuard` for the length of ``fit``. As with
``save_on_signal`` for PyTorch (:mod:`safepoint.preemption`), the handler only notes
the signal; the callback's next batch end (or epoch end, or the end of training) is
the safe point where the backup is saved, whole and committed, before the process
exits with ``128 + signal``. Running the same script again resumes from it exactly,
mid-epoch included.

Keras calls no callback when ``fit`` dies of an exception, so the guard may outlive
its ``fit``. A signal that finds no running ``fit`` of this callback on the stack is
therefore not held back for a safe point that will never come: the guard steps aside
and the signal goes to the handler that was there before (by default, the process
ends as it would have without safepoint).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any

from safepoint.checkpoint import Checkpoint
from safepoint.errors import ConfigError
from safepoint.manager import CheckpointManager
from safepoint.preemption import SaveOnSignal, active

log = logging.getLogger("safepoint")

#: Schedulers' preemption signals (SLURM: SIGTERM, or ``--signal=USR1@90``). Not
#: SIGINT: Ctrl-C in a notebook must interrupt ``fit`` at once, as it does in Keras.
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


def check_signals(signals: Iterable[int] | None) -> tuple[signal.Signals, ...]:
    """The signals to catch during ``fit`` (empty: none); ``ConfigError`` if invalid."""
    if signals is None:
        return ()
    try:
        found = tuple(signal.Signals(s) for s in signals)
    except (TypeError, ValueError):
        found = None
    if found is None or signal.SIGKILL in found or signal.SIGSTOP in found:
        raise ConfigError(
            "Invalid signals for BackupAndRestore. Expected catchable signals such as "
            f"signal.SIGTERM, or () for none. Received: signals={signals!r}. SIGKILL cannot "
            "be caught: a fit killed by it resumes from the last backup."
        )
    return found


class FitGuard(SaveOnSignal):
    """A preemption guard whose save is ``save()`` and that lives as long as ``fit``.

    ``running`` is the ``CallbackList`` of the guarded ``fit``: while ``fit`` runs, a
    frame on the main thread's stack holds it.
    """

    def __init__(
        self,
        manager: CheckpointManager,
        save: Callable[[], Checkpoint],
        running: Any,
        signals: tuple[signal.Signals, ...],
    ) -> None:
        self._save_backup = save
        self._running = running
        super().__init__(manager, save, signals=signals)

    def _fit_running(self, frame: FrameType | None) -> bool:
        while frame is not None:
            if any(v is self._running for v in frame.f_locals.values()):
                return True
            frame = frame.f_back
        return False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() == self._pid and self.pending is None and not self._fit_running(frame):
            # fit() died of an exception and nobody removed this guard: hand the signal
            # to the handler that was there before, as if safepoint had never been here.
            self.remove()
            signal.raise_signal(signum)
            return
        super()._handle(signum, frame)

    def _save_state(
        self, *, step: int | None, epoch: int | None, metrics: Mapping[str, Any] | None
    ) -> Checkpoint:
        return self._save_backup()


def install(
    manager: CheckpointManager,
    save: Callable[[], Checkpoint],
    running: Any,
    signals: tuple[signal.Signals, ...],
) -> FitGuard | None:
    """A guard for this ``fit``, or None where none can be installed (said in the log)."""
    if not signals or running is None:
        return None
    current = active()
    if isinstance(current, FitGuard):
        current.remove()  # left by a fit that died of an exception
    elif current is not None:
        log.info("safepoint: BackupAndRestore leaves signals to the save_on_signal guard.")
        return None
    if threading.current_thread() is not threading.main_thread():
        log.info(
            "safepoint: fit() runs outside the main thread, where Python cannot catch "
            "signals; BackupAndRestore saves on its schedule only."
        )
        return None
    return FitGuard(manager, save, running, signals)


__all__ = ["DEFAULT_SIGNALS", "FitGuard", "check_signals", "install"]
