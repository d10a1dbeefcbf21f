"""``safepoint.keras.ModelCheckpoint``: Keras' callback, committed atomically.

A drop-in for ``keras.callbacks.ModelCheckpoint`` that also runs Keras 2 code: the
decisions and verbose lines come from :class:`safepoint.policy.SavePolicy` (Keras 3's
rules and text), the files are the ones Keras writes (:mod:`.files`), and each one is
committed by ``CheckpointManager.save_file`` (safepoint's manifest inside), so a
``CheckpointManager`` on the directory lists, verifies, restores and prunes them.

Where it differs from Keras 3.15, on purpose:

* ``.h5``/``.hdf5`` and ``acc``/``val_acc`` (Keras 2) are accepted, with one notice
  (the names are read as Keras 3's only where the logs lack them as given);
* a bad ``mode`` is a ``ConfigError`` instead of a silent fall back to ``"auto"``;
* a monitored metric missing from the logs is an error at the first save, instead of
  a warning every epoch and a save of every model;
* integer ``save_freq`` with ``save_best_only`` works (Keras 3.15 crashes on it,
  because it looks up the metric direction only at the end of an epoch);
* ``keep=safepoint.Keep(...)`` prunes the files it wrote.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import keras
from keras.src.utils import io_utils

from safepoint.errors import ConfigError, SafepointError
from safepoint.keras import files, names
from safepoint.manager import CheckpointManager
from safepoint.monitor import MODES, resolve_mode
from safepoint.ondisk.template import NameTemplate
from safepoint.policy import SavePolicy, check_save_freq
from safepoint.retention import Keep
from safepoint.storage.local import check_name
from safepoint.storage.worker import SaveWorker

log = logging.getLogger("safepoint")


def _direction(model: Any, monitor: str) -> str | None:
    """``"max"``/``"min"`` from a compiled Keras metric's declared direction, if any."""
    base = monitor.removeprefix("val_")
    found: list[Any] = []
    for metric in getattr(model, "metrics", None) or []:
        found.extend(getattr(metric, "metrics", None) or [metric])
    for metric in found:
        direction = getattr(metric, "_direction", None)
        if getattr(metric, "name", None) == base and direction in ("up", "down"):
            return "max" if direction == "up" else "min"
    return None


#: Frames of these packages are not the user's: a notice points at the user's fit().
_INTERNAL = (
    os.path.dirname(os.path.abspath(keras.__file__)) + os.sep,
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
)


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside Keras and safepoint."""
    frame = sys._getframe(1)  # the caller of warnings.warn: stacklevel 1
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    return level


def _log_skips(manager: CheckpointManager, skips: list[dict[str, Any]]) -> None:
    """Record skipped saves in the run log, best effort (the log is informational)."""
    for skip in skips:
        try:
            manager.log_skip(**skip)
        except SafepointError as exc:
            log.warning("safepoint: could not write the run log (skip): %s", exc)
            return


class ModelCheckpoint(keras.callbacks.Callback):
    """Save the model or its weights when Keras' ModelCheckpoint would, crash-safely.

    Arguments are Keras 3's; ``keep`` (keyword-only) is a :class:`safepoint.Keep`
    policy applied to the files in the filepath's directory after each save.
    """

    def __init__(
        self,
        filepath: str | os.PathLike[str],
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        *,
        keep: Keep | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(filepath, str | os.PathLike):
            raise ConfigError(
                f"filepath must be a str or os.PathLike. Received: filepath={filepath!r}. Pass "
                "a path such as 'weights.best.hdf5'."
            )
        self.filepath = os.fspath(filepath)
        self.layout = files.layout_for(self.filepath, bool(save_weights_only))
        if mode not in MODES:
            raise ConfigError(
                f"ModelCheckpoint mode '{mode}' is unknown. Expected one of {MODES}. Received: "
                f"mode={mode!r}, filepath={self.filepath}. Pass mode='max' for accuracy-like "
                "metrics, 'min' for losses, or 'auto'."
            )
        check_save_freq(save_freq)
        if keep is not None and not isinstance(keep, Keep):
            raise ConfigError(f"keep must be a safepoint.Keep or None. Received: keep={keep!r}.")
        self.directory, tail = os.path.split(self.filepath)
        if "{" in self.directory or "}" in self.directory:
            raise ConfigError(
                "Only the file name of ModelCheckpoint's filepath may hold fields. Received: "
                f"filepath={self.filepath}. Move the fields into the file name."
            )
        self.template = NameTemplate(tail)
        self.monitor = monitor
        self.verbose = verbose
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.mode = mode
        self.save_freq = save_freq
        self.keep = keep
        # The policy reads the user's name from logs with the Keras 2 aliases added
        # (names.aliased), so 'val_acc' finds 'val_acc' when a metric is named "acc"
        # and Keras 3's 'val_accuracy' otherwise.
        self.policy = SavePolicy(
            monitor=monitor,
            label=monitor,
            mode=None,
            save_best_only=self.save_best_only,
            save_freq=save_freq,
            initial_value_threshold=initial_value_threshold,
        )
        # The log key of the monitor (see names.key), known from the first logs.
        self._key = monitor
        self._noticed = False
        self._manager: CheckpointManager | None = None
        self._current_epoch = 0
        self._batches_done = 0
        self._checked = False
        # The manager's worker: one commit in flight, its error raised by wait(), and
        # reported at exit when fit() died before on_train_end collected it.
        self._committer = SaveWorker(os.path.abspath(self.directory or os.curdir))
        self._skips: list[dict[str, Any]] = []

    # -- Keras attributes -----------------------------------------------------------------
    @property
    def best(self) -> float | None:
        """The best monitored value so far (None before the first)."""
        return self.policy.best

    @best.setter
    def best(self, value: float | None) -> None:
        self.policy.best = value

    # -- hooks ----------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._checked = False

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current_epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._batches_done += 1
        if self.save_freq != "epoch" and self.policy.count_batch(batch):
            self._save(self._current_epoch, batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not self._checked:
            self._check_logs(epoch, names.numeric(logs), batch=None)
        if self.save_freq == "epoch":
            self._save(epoch, None, logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        manager, self._manager = self._manager, None
        self._committer.wait()  # fit() returns with every file committed
        skips, self._skips = self._skips, []
        if manager is not None:
            _log_skips(manager, skips)

    # -- state, for BackupAndRestore -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Best value, batch counters and epoch: what an exact resume needs.

        Waits for the commit in flight first: ``best`` changes only once a save has
        committed, and a backup must not hold a best that no file on disk holds (a
        failed commit raises here instead).
        """
        self._committer.wait()
        return {
            "policy": self.policy.state_dict(),
            "current_epoch": self._current_epoch,
            "batches_done": self._batches_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self._current_epoch = int(state["current_epoch"])
        self._batches_done = int(state["batches_done"])

    # -- saving ---------------------------------------------------------------------------
    def _check_logs(self, epoch: int, logged: dict[str, float], *, batch: int | None) -> None:
        """Fail clearly, once, when the monitor or a filename field is not logged.

        Also resolves the monitor's log key, and gives the one notice when a Keras 2
        name is read from its Keras 3 name (only then: a metric *named* ``"acc"`` is
        logged as ``acc`` and read as it is).
        """
        self._checked = True
        self._key = names.key(self.monitor, logged)
        legacy = names.aliased_in([self.monitor, *self.template.fields], logged)
        if legacy and not self._noticed:
            self._noticed = True  # once per callback, however many fits it serves
            warnings.warn(names.notice(legacy), UserWarning, stacklevel=_user_stacklevel())
        values = names.aliased(logged)
        where = f"the logs of epoch {epoch + 1}" if batch is None else "the batch logs"
        needs_monitor = self.save_best_only or (self.keep is not None and self.keep.best)
        if needs_monitor and self.monitor not in values:
            hint = (
                "Batch logs hold training metrics only: monitor a training metric such as "
                "'loss', or use save_freq='epoch'"
                if batch is not None and self.monitor.startswith("val_")
                else "Pass validation_data= or validation_split= to fit() for 'val_' metrics, "
                "or monitor one of the logged metrics"
            )
            raise ConfigError(
                f"ModelCheckpoint monitors {self.monitor!r} but {where} do not contain it. "
                f"Expected one of {sorted(logged)}. Received: monitor={self.monitor!r}, "
                f"filepath={self.filepath}. {hint}."
            )
        known = {"epoch", *values} | ({"batch"} if batch is not None else set())
        missing = [f for f in self.template.fields if f not in known]
        if missing:
            raise ConfigError(
                f"Failed to format this callback filepath: {missing} are not logged metrics. "
                f"Expected fields among 'epoch'{', batch' if batch is not None else ''} and "
                f"{sorted(logged)}. Received: filepath={self.filepath}. Use logged metric "
                "names in the filepath."
            )

    def _mode(self) -> str:
        """Resolve ``mode='auto'`` like Keras: by name, else by the metric's direction."""
        try:
            found = resolve_mode(self.monitor, self.mode)
        except ConfigError:
            found = _direction(self.model, self._key)
            if found is None:
                raise
        return str(found)

    def _save(self, epoch: int, batch: int | None, logs: dict[str, Any] | None) -> None:
        self._committer.wait()  # the previous save's commit, and its error if it failed
        logged = names.numeric(logs)  # what the manifest records: each metric once
        if not self._checked:
            self._check_logs(epoch, logged, batch=batch)
        values = names.aliased(logged)  # the user's words: monitor and filename fields
        if self.save_best_only and self.policy.mode is None:
            self.policy.mode = self._mode()
        fields: dict[str, Any] = {**values, "epoch": epoch + 1}
        if batch is not None and "batch" not in values:
            fields["batch"] = batch + 1
        try:
            name = check_name(self.template.template.format(**fields), what="file name")
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"Failed to format this callback filepath: {exc}. Received: "
                f"filepath={self.filepath}. Match each field's format spec to its value."
            ) from None
        shown = os.path.join(self.directory, name) if self.directory else name
        decision = self.policy.decide(epoch, values, shown)
        if self.verbose > 0:
            io_utils.print_msg(f"\n{decision.message}")
        manager = self._open_manager()
        step = epoch + 1 if batch is None else self._batches_done
        if not decision.save:
            # Logged with the next commit, off the training thread (the log is informational).
            self._skips.append(
                {"step": step, "epoch": epoch + 1, "metrics": logged, "reason": decision.reason}
            )
            return
        skips, self._skips = self._skips, []
        # The manager holds the directory's writer lock from this write to the commit
        # only: Keras has no hook for a fit that dies of an exception, and a lock kept
        # past it would refuse the next fit in the same process (a notebook's retry).
        staged = manager.stage_file(
            name,
            files.writer(self.model, self.layout),
            step=step,
            epoch=epoch + 1,
            metrics=logged,
            layout=self.layout,
        )

        def commit() -> None:
            staged.commit()
            self.policy.accept(decision.value)  # committed: now it is the best on disk
            if self.verbose > 0:
                # Said once the file is committed, never for a commit that failed. The
                # next save and the end of fit() wait for this, so the lines keep
                # Keras' order.
                io_utils.print_msg(f"\nEpoch {epoch + 1}: finished saving model to {shown}")
            # Only after the commit: the log is informational, and a failure to write
            # it must never fail (or leave uncommitted) a save.
            _log_skips(manager, skips)

        # The model is in the staged file now; sealing, fsyncs and the rename overlap
        # the next training steps. The next save and the end of fit() wait for them.
        self._committer.submit(name, commit)

    def _open_manager(self) -> CheckpointManager:
        if self._manager is None:
            best = self.keep is not None and self.keep.best
            # The manager's name template is this callback's file name template: its
            # series, the only files that its Keep may ever prune.
            manager = CheckpointManager(
                self.directory or os.curdir,
                name=self.template.template,
                monitor=self._key if best else None,
                mode=self._mode() if best else "auto",
                keep=self.keep,
            )
            self._manager = manager
        return self._manager


__all__ = ["ModelCheckpoint"]
