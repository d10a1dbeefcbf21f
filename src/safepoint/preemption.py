"""Preemption: turn SIGTERM, SIGUSR1 or Ctrl-C into a committed checkpoint, then exit.

Cluster schedulers announce a preemption with a signal (SLURM sends SIGTERM, or a
chosen signal with ``--signal=USR1@90``) and kill the job with SIGKILL after a grace
period. Saving *inside* the signal handler would snapshot a model in the middle of an
optimizer step, so the handler only records the signal; the checkpoint is written at
the next *safe point*: the next call the loop makes into safepoint
(``ModelCheckpoint.on_batch_end``/``on_epoch_end``, or :meth:`SaveOnSignal.check`),
where the state is between two steps. The save is synchronous (the process is about
to exit), then the process exits with ``128 + signal`` and a message saying where the
checkpoint is. In Keras ``fit``, ``safepoint.keras.BackupAndRestore`` installs its own
guard for the length of ``fit`` (:mod:`safepoint.keras.preempt`).

The guard knows how long saves take (recent saves of this run, read from the run log
when it is installed, and every save a ``ModelCheckpoint`` makes afterwards) and the
time between safe points, and warns when their sum exceeds the scheduler's
``grace_period``: the kill would then come before the commit.

DataLoader worker processes inherit the handler and ignore these signals: a scheduler
signals the whole process group, and a worker killed by it would make torch raise in
the main process before it reaches the safe point. One guard per process: signal
handlers are process-wide.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any, Protocol

from safepoint.checkpoint import Checkpoint
from safepoint.errors import ConfigError, SafepointError
from safepoint.storage import runlog
from safepoint.storage.protocol import Storage

log = logging.getLogger("safepoint")

#: SIGTERM (schedulers, ``kill``), SIGUSR1 (SLURM ``--signal``) and SIGINT (Ctrl-C).
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_active: SaveOnSignal | None = None


class Saver(Protocol):
    """What a guard saves through: a ``CheckpointManager``. This module never imports
    the manager (the manager imports it, for ``save_on_signal``), so the two form no
    import cycle."""

    storage: Storage

    def save(
        self,
        state: Any,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Checkpoint: ...

    def wait(self) -> None: ...


def _in_data_worker() -> bool:
    """True in a torch DataLoader worker process (torch is consulted only if imported)."""
    data = sys.modules.get("torch.utils.data")
    return data is not None and data.get_worker_info() is not None


def active() -> SaveOnSignal | None:
    """The guard installed in this process, if any."""
    return _active


def record_save(seconds: float) -> None:
    """Tell the installed guard (if any) how long a save took."""
    if _active is not None:
        _active.record_save(seconds)


class SaveOnSignal:
    """On a signal, save ``state`` at the next safe point and exit (see module doc).

    ``state`` is the dict to save or a function returning it. ``grace_period`` is the
    seconds the scheduler waits between its signal and SIGKILL (``None``: no warning).
    ``exit_code`` overrides the ``128 + signal`` exit status. Use it as a context
    manager, or call :meth:`remove`, to put the previous signal handlers back.
    """

    def __init__(
        self,
        manager: Saver,
        state: Mapping[str, Any] | Callable[[], Any],
        *,
        signals: Iterable[int] = DEFAULT_SIGNALS,
        grace_period: float | None = None,
        exit_code: int | None = None,
        print_fn: Callable[[str], None] | None = None,
    ) -> None:
        global _active
        if state is None or not (isinstance(state, Mapping) or callable(state)):
            raise ConfigError(
                "save_on_signal needs the state to save. Expected a dict or a function "
                f"returning it. Received: state={state!r}. Pass the same state you give "
                "to save()."
            )
        sigs = tuple(signal.Signals(s) for s in signals)
        if not sigs or signal.SIGKILL in sigs:
            raise ConfigError(
                "Invalid signals. Expected one or more catchable signals such as SIGTERM. "
                f"Received: signals={sigs!r}. SIGKILL cannot be caught: rely on the last "
                "committed checkpoint for it."
            )
        if grace_period is not None and not (
            isinstance(grace_period, int | float) and grace_period > 0
        ):
            raise ConfigError(
                f"Invalid grace_period. Expected seconds > 0 or None. Received: "
                f"grace_period={grace_period!r}."
            )
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError(
                "save_on_signal must be called from the main thread (Python delivers signals "
                "there). Received: a call from thread "
                f"{threading.current_thread().name!r}. Install it before starting threads."
            )
        if _active is not None:
            raise ConfigError(
                "A save_on_signal guard is already installed in this process. Expected one "
                f"guard. Received: a second one for {manager!r}. Call .remove() on the first."
            )
        self.manager = manager
        self.state = state
        self.signals = sigs
        self.grace_period = None if grace_period is None else float(grace_period)
        self.exit_code = exit_code
        self.print_fn = print_fn
        self.pending: signal.Signals | None = None
        self._pid = os.getpid()
        self._saves: collections.deque[float] = collections.deque(maxlen=8)
        self._last_call: float | None = None
        self._interval = 0.0
        self._warned = False
        try:  # past save times, for the grace-period check: informational, best effort
            history = runlog.read(manager.storage)[-8:]
        except SafepointError as exc:
            log.warning("safepoint: could not read the run log: %s", exc)
            history = []
        for entry in history:
            if entry.get("event") == "save" and isinstance(entry.get("seconds"), int | float):
                self._saves.append(float(entry["seconds"]))
        self._previous = {s: signal.signal(s, self._handle) for s in sigs}
        _active = self
        self._check_grace()

    # -- installation ------------------------------------------------------------------
    def remove(self) -> None:
        """Put the signal handlers that were there before back."""
        global _active
        if _active is self:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            _active = None

    def __enter__(self) -> SaveOnSignal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- timing --------------------------------------------------------------------------
    def expected_seconds(self) -> float:
        """Time from a signal to the commit: one interval between safe points + a save."""
        return self._interval + (max(self._saves) if self._saves else 0.0)

    def record_save(self, seconds: float) -> None:
        self._saves.append(float(seconds))
        self._check_grace()

    def _check_grace(self) -> None:
        if self.grace_period is None or self._warned:
            return
        needed = self.expected_seconds()
        if needed > self.grace_period:
            self._warned = True
            log.warning(
                "safepoint: the grace period is too short for a save on preemption. Expected "
                "a grace period above the time from a signal to the commit. Received: "
                "grace_period=%.3g s, while a step takes %.3g s and recent saves took up to "
                "%.3g s. Ask the scheduler for a longer grace period (SLURM: "
                "--signal=USR1@SECONDS) or make saves smaller or faster.",
                self.grace_period,
                self._interval,
                max(self._saves, default=0.0),
            )

    # -- signals -------------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            if _in_data_worker():
                # A scheduler signals the whole process group. A DataLoader worker that
                # died of it would make torch raise in the main process in the middle of
                # a step, before the safe point; the main process saves, then shuts its
                # workers down (and they exit by themselves if it is gone).
                return
            # Any other forked child keeps the default behaviour: it dies.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        sig = signal.Signals(signum)
        if self.pending is not None:
            if sig == signal.SIGINT:  # a second Ctrl-C: the user does not want to wait
                raise KeyboardInterrupt
            return
        self.pending = sig
        text = (
            f"safepoint: received {sig.name}; saving a checkpoint at the next safe point, "
            "then exiting."
        )
        if self.grace_period is not None and self.expected_seconds() > self.grace_period:
            text += (
                f" Warning: that may take {self.expected_seconds():.3g} s, longer than the "
                f"grace period of {self.grace_period:.3g} s."
            )
        # os.write, not print: the handler may interrupt a print on the same stream.
        os.write(2, (text + "\n").encode())

    # -- safe points ---------------------------------------------------------------------
    def safe_point(
        self,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        saved: Checkpoint | None = None,
    ) -> None:
        """Called between steps: save and exit if a signal came since the last call.

        ``saved`` is a checkpoint committed at this very point (the regular schedule
        saved this step), which then needs no second save.
        """
        now = time.perf_counter()
        if self._last_call is not None:
            self._interval = now - self._last_call
        self._last_call = now
        if self.pending is not None:
            self._save_and_exit(step=step, epoch=epoch, metrics=metrics, saved=saved)

    def check(
        self,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """A safe point for loops that do not use ``ModelCheckpoint``: call it every step."""
        self.safe_point(step=step, epoch=epoch, metrics=metrics)

    def _save_state(
        self, *, step: int | None, epoch: int | None, metrics: Mapping[str, Any] | None
    ) -> Checkpoint:
        """The save a signal asks for (a framework's guard saves its own way)."""
        state = self.state() if callable(self.state) else self.state
        clean = {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float)}
        return self.manager.save(state, step=step, epoch=epoch, metrics=clean)

    def _save_and_exit(
        self,
        *,
        step: int | None,
        epoch: int | None,
        metrics: Mapping[str, Any] | None,
        saved: Checkpoint | None,
    ) -> None:
        sig = self.pending
        assert sig is not None
        started = time.perf_counter()
        if saved is None:
            saved = self._save_state(step=step, epoch=epoch, metrics=metrics)
        # The process exits next: whatever the manager's saving mode, the checkpoint
        # must be committed before that.
        self.manager.wait()
        seconds = time.perf_counter() - started
        code = 128 + int(sig) if self.exit_code is None else self.exit_code
        text = (
            f"safepoint: {sig.name} received; checkpoint {saved.name} committed in "
            f"{seconds:.2f} s at {saved.path}. Exiting with status {code}; run the same "
            "command again to resume from it."
        )
        self.remove()
        if self.print_fn is not None:
            self.print_fn(text)
        else:
            os.write(2, (text + "\n").encode())
        raise SystemExit(code)


__all__ = ["DEFAULT_SIGNALS", "SaveOnSignal", "Saver", "active", "record_save"]
