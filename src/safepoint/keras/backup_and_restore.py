"""``safepoint.keras.BackupAndRestore``: resume an interrupted ``fit`` exactly.

A drop-in for ``keras.callbacks.BackupAndRestore`` that saves the whole training
state (:mod:`.state`) through a :class:`~safepoint.CheckpointManager`: atomic commits,
checksums, the two newest backups kept, and a corrupt newest backup skipped in favour
of the previous one (saying which). A ``fit`` killed at any moment and started again
by the same script ends with the weights an uninterrupted ``fit`` would have.

How a resume replays the run exactly:

* Order. In ``on_train_begin`` the callback moves itself to the end of ``fit``'s
  callback list (found on the calling frame), so every backup is taken after the
  other callbacks have handled the same epoch or batch, and their saved state is
  consistent with the model's.
* Epoch boundary. The backup holds epoch ``e`` done; the restored run starts at
  ``e + 1`` (``model._initial_epoch``, as Keras does) with the generators as they
  were.
* Mid-epoch (integer ``save_freq``). The backup also holds the generator state from
  the start of the interrupted epoch. The resumed epoch restores that state first,
  so the data loader draws the same shuffle, then skips the batches already trained
  (``train_function`` returns at once, and the other callbacks do not see them), and
  restores the generators, metric accumulators and callback states of the moment of
  the backup before training the next batch.
* Preemption. SIGTERM or SIGUSR1 during ``fit`` is noted, and the next batch end
  saves a mid-epoch backup (the epoch-start generators are kept for it whatever
  ``save_freq`` is) and exits; see :mod:`.preempt`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from typing import Any

import keras
from keras.src.utils import io_utils

from safepoint.checkpoint import Checkpoint
from safepoint.errors import ConfigError, SafepointError
from safepoint.keras import names, preempt, series, state
from safepoint.manager import CheckpointManager
from safepoint.policy import SavePolicy, check_save_freq
from safepoint.state.rng import RNGState
from safepoint.storage.local import LOG_NAME


def _callback_list(me: Any) -> Any:
    """The ``CallbackList`` that is calling ``me`` (looked up on the calling frames).

    Keras passes callbacks no reference to their siblings; the list that dispatches
    ``on_train_begin`` is the one ``fit`` uses for the whole run.
    """
    frame = inspect.currentframe()
    try:
        caller = frame.f_back if frame is not None else None
        for _ in range(8):
            if caller is None:
                return None
            owner = caller.f_locals.get("self")
            if isinstance(owner, keras.callbacks.CallbackList) and any(
                c is me for c in owner.callbacks
            ):
                return owner
            caller = caller.f_back
        return None
    finally:
        del frame


class BackupAndRestore(keras.callbacks.Callback):
    """Back up the full training state every epoch (or every ``save_freq`` batches).

    ``backup_dir`` may hold other files (a ``ModelCheckpoint``'s ``best.keras``):
    only this callback's own backups (:mod:`.series`) are restored from, pruned and
    deleted. ``double_checkpoint`` is accepted for compatibility: the two newest
    backups are always kept. ``signals`` (keyword-only; ``()`` for none) are caught
    during ``fit``: on one, a backup is saved at the next batch end and the process
    exits with ``128 + signal`` (:mod:`.preempt`).
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int | bool = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        *,
        signals: Iterable[int] | None = preempt.DEFAULT_SIGNALS,
    ) -> None:
        super().__init__()
        if not isinstance(backup_dir, str | os.PathLike) or not os.fspath(backup_dir):
            raise ConfigError(
                "Empty or invalid backup_dir. Expected a directory path. Received: "
                f"backup_dir={backup_dir!r}. Pass a directory used only by this callback."
            )
        self.backup_dir = os.fspath(backup_dir)
        if os.path.exists(self.backup_dir) and not os.path.isdir(self.backup_dir):
            raise ConfigError(
                "backup_dir is a file. Expected a directory (or a path that does not exist "
                f"yet). Received: backup_dir={self.backup_dir}. Choose another path."
            )
        if save_freq is not False:
            check_save_freq(save_freq)
        self.save_freq = save_freq
        self.double_checkpoint = double_checkpoint
        self.delete_checkpoint = delete_checkpoint
        self.signals = preempt.check_signals(signals)
        self._guard: preempt.FitGuard | None = None
        # Where the next safe point is (see _safe_point), and the last backup saved.
        self._point: dict[str, Any] = {}
        self._last: tuple[int, int, Checkpoint] | None = None
        self._counter = SavePolicy(
            monitor="loss",
            mode=None,
            save_best_only=False,
            save_freq=save_freq if save_freq is not False else "epoch",
        )
        self._manager: CheckpointManager | None = None
        self._list: Any = None
        self._pending: dict[str, Any] | None = None
        self._replay: dict[str, Any] | None = None
        self._epoch = 0
        self._done = 0  # epochs completed, for a safe point at the end of training
        self._step = 0
        self._epoch_rng: dict[str, Any] = {}

    # -- the other callbacks ----------------------------------------------------------------
    def _others(self) -> list[Any]:
        return [] if self._list is None else [c for c in self._list.callbacks if c is not self]

    def _go_last(self, logs: dict[str, Any] | None) -> None:
        """Move this callback to the end of ``fit``'s list, keeping on_train_begin order.

        The list is being iterated (this is its ``on_train_begin``): cutting it after
        this callback ends that loop here, so the callbacks after it get their
        ``on_train_begin`` from us, once, before the backup is restored into them.
        """
        running = self._list.callbacks
        order = list(running)
        after = order[order.index(self) + 1 :]
        del running[order.index(self) + 1 :]
        for cb in after:
            cb.on_train_begin(logs)
        self._list.callbacks = [c for c in order if c is not self] + [self]

    # -- hooks ------------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if not self.model.built:
            raise ConfigError(
                "To use the BackupAndRestore callback, your model must be built before you "
                f"call `fit()`. Received: an unbuilt model, backup_dir={self.backup_dir}. "
                "Build it by calling it on a batch of data, or pass keras.Input to it."
            )
        self._list = _callback_list(self)
        if self._list is not None:
            self._go_last(logs)
        # No Keep on the manager: its retention would weigh every checkpoint in the
        # folder (a best.keras beside the backups), while this callback prunes its own.
        self._manager = CheckpointManager(self.backup_dir, name=series.NAME)
        ckpt, skipped = series.restore(self._manager)
        self._pending = None
        self._step = 0
        self._last = None
        self._done = 0
        if ckpt is not None:
            self._resume(ckpt, skipped)
        self._install_guard()  # last: a refused backup raises before any handler is set

    def _resume(self, ckpt: Checkpoint, skipped: list[str]) -> None:
        """Load the backup ``ckpt`` into the model; the rest waits for on_epoch_begin.

        ``skipped``: the newer backups that were damaged, named in one message.
        """
        if skipped:
            paths = ", ".join(os.path.join(self.backup_dir, n) for n in skipped)
            which = "the previous one" if len(skipped) == 1 else "an older one"
            io_utils.print_msg(
                f"BackupAndRestore: backup{'s' if len(skipped) > 1 else ''} {paths} "
                f"{'is' if len(skipped) == 1 else 'are'} corrupt or unreadable; resuming "
                f"from {which}, {ckpt.path} (epoch {ckpt.state['progress']['epoch']}, "
                f"batch {ckpt.state['progress']['batch']})."
            )
        saved = ckpt.state
        # Every group is checked before any is assigned: a refused backup leaves the
        # model as it was (the caller may go on without it).
        groups = [
            (self.model.variables, saved["model"], "model variables"),
            (state.optimizer_variables(self.model), saved["optimizer"], "optimizer state"),
            (state.global_seed_variables(), saved["keras_seed"], "Keras seed generator"),
        ]
        for variables, values, what in groups:
            state.check(variables, values, what, ckpt.path)
        for variables, values, what in groups:
            state.assign(variables, values, what, ckpt.path)
        progress = saved["progress"]
        self._counter.load_state_dict(progress["counter"])
        self._step = int(ckpt.step or 0)
        epochs = int((self.params or {}).get("epochs", progress["epoch"]))
        self.model._initial_epoch = epochs if progress["stop_training"] else progress["epoch"]
        self._done = int(self.model._initial_epoch)
        if int(progress["batch"]) == 0:
            # The epoch boundary: the others' states are those after this epoch ended.
            self._load_callbacks(saved["callback_states"])
        self._pending = saved

    def _install_guard(self) -> None:
        """Catch preemption signals for the length of this fit (see :mod:`.preempt`)."""
        assert self._manager is not None
        self._guard = preempt.install(self._manager, self._signal_save, self._list, self.signals)

    def _remove_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.remove()

    def _safe_point(self, *, epoch: int, batch: int, logs: dict[str, Any] | None) -> None:
        """Between two steps: save and exit when a preemption signal came since the last.

        ``epoch``/``batch`` as for :meth:`_save`. A backup already saved at this very
        point (the schedule's) is not saved twice.
        """
        if self._guard is None:
            return
        self._point = {"epoch": epoch, "batch": batch, "logs": logs}
        last = self._last
        saved = last[2] if last is not None and last[:2] == (self._step, batch) else None
        self._guard.safe_point(
            step=self._step, epoch=epoch, metrics=names.numeric(logs), saved=saved
        )

    def _signal_save(self) -> Checkpoint:
        return self._save(**self._point)

    def _load_callbacks(self, saved: dict[str, Any]) -> None:
        unmatched = state.load_callback_states(self._others(), saved)
        if unmatched:
            io_utils.print_msg(
                f"BackupAndRestore: no callback in this run matches the backed-up state of "
                f"{unmatched}; those callbacks start fresh."
            )

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        saved, self._pending = self._pending, None
        if saved is not None:
            skip = int(saved["progress"]["batch"])
            if skip:
                # Mid-epoch: replay the start of the epoch so the loader draws the same
                # order, then skip the batches that were already trained.
                RNGState().load_state_dict(saved["epoch_rng"])
                self._start_replay(saved, skip)
            else:
                RNGState().load_state_dict(saved["rng"])
        # The generators at the start of the epoch, for a backup taken in its middle (on
        # the schedule, or on a preemption signal): a resume replays the epoch's shuffle.
        mid_epoch = self.save_freq not in ("epoch", False) or self._guard is not None
        self._epoch_rng = RNGState().state_dict() if mid_epoch else {}

    def _start_replay(self, saved: dict[str, Any], skip: int) -> None:
        model = self.model
        original = model.train_function
        batch_logs = saved["progress"]["logs"]
        model.train_function = lambda data: dict(batch_logs)
        full = self._list.callbacks if self._list is not None else None
        if self._list is not None:
            self._list.callbacks = [self]
        self._replay = {**saved, "left": skip, "train_function": original, "list": full}

    def _finish_replay(self) -> None:
        replay, self._replay = self._replay, None
        assert replay is not None
        self.model.train_function = replay["train_function"]
        if replay["list"] is not None:
            self._list.callbacks = replay["list"]
        state.assign(self.model.metrics_variables, replay["metrics"], "metric accumulators")
        self._load_callbacks(replay["callback_states"])
        RNGState().load_state_dict(replay["rng"])

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._replay is not None:
            self._replay["left"] -= 1
            if self._replay["left"] <= 0:
                self._finish_replay()
            return
        self._step += 1
        if self.save_freq not in ("epoch", False) and self._counter.count_batch(batch):
            self._save(epoch=self._epoch, batch=batch + 1, logs=logs)
        self._safe_point(epoch=self._epoch, batch=batch + 1, logs=logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._done = epoch + 1
        if self.save_freq == "epoch":
            self._save(epoch=epoch + 1, batch=0, logs=logs)
        self._safe_point(epoch=epoch + 1, batch=0, logs=logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._guard is not None:
            # From here on a signal goes to the handler that was there before; one that
            # came after the last epoch's safe point is still pending, and saved now:
            # training is complete, the script's next steps are not, and the backup
            # lets a rerun get to them.
            self._guard.remove()
            if self._manager is not None:
                self._safe_point(epoch=self._done, batch=0, logs=logs)
        self._remove_guard()
        manager, self._manager = self._manager, None
        self.model._initial_epoch = None
        if manager is None:
            return
        if self.delete_checkpoint:
            series.delete_all(manager)  # its own backups only, never a file beside them
        manager.close()  # releases the lock
        if self.delete_checkpoint:
            # The run log and the folder go only when nothing else is left in it: a
            # ModelCheckpoint's file (or a user's) beside the backups keeps both.
            log = os.path.join(self.backup_dir, LOG_NAME)
            if os.path.isdir(self.backup_dir) and os.listdir(self.backup_dir) == [LOG_NAME]:
                os.unlink(log)
            if os.path.isdir(self.backup_dir) and not os.listdir(self.backup_dir):
                os.rmdir(self.backup_dir)

    # -- saving -----------------------------------------------------------------------------
    def _save(self, *, epoch: int, batch: int, logs: dict[str, Any] | None) -> Checkpoint:
        """Back up the state after ``batch`` batches of 0-based ``epoch`` (0: epoch start)."""
        if self._manager is None:
            raise SafepointError("BackupAndRestore saved outside fit(); this is a bug.")
        model = self.model
        metrics = names.numeric(logs)
        tree = {
            "model": state.values(model.variables),
            "optimizer": state.values(state.optimizer_variables(model)),
            "metrics": state.values(model.metrics_variables),
            "keras_seed": state.values(state.global_seed_variables()),
            "rng": RNGState().state_dict(),
            "epoch_rng": self._epoch_rng or {},
            "callback_states": state.callback_states(self._others()),
            "progress": {
                "epoch": epoch,
                "batch": batch,
                "stop_training": bool(getattr(model, "stop_training", False)),
                "counter": self._counter.state_dict(),
                "logs": metrics,
            },
        }
        try:
            saved = self._manager.save(tree, step=self._step, epoch=epoch, metrics=metrics)
            self._last = (self._step, batch, saved)
            series.prune(self._manager)  # still under the lock the save took
        finally:
            # Held for the save only: a fit that dies of an exception gets no callback,
            # and a retry in the same process must be able to take the lock again.
            self._manager.release_lock()
        return saved


__all__ = ["BackupAndRestore"]
