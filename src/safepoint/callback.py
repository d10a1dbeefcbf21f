"""``ModelCheckpoint``: Keras' decisions about *when* to save, for any training loop.

Call ``on_epoch_end(epoch, logs)`` (and ``on_batch_end(batch, logs)`` for
``save_freq=N``) from your loop; the callback decides whether to save (every epoch,
every N batches, or only on improvement of ``monitor``), prints Keras 3's messages
(``Epoch 12: val_acc improved from 0.70079 to 0.70866, saving model to ...``) and hands
the state to a :class:`~safepoint.CheckpointManager`. Epochs are 0-based in the hooks,
as in Keras, and 1-based in messages, names and ``Checkpoint.epoch`` (the number of
completed epochs, which is where a resumed loop starts).

The best value so far is derived from the checkpoints already in the root, so a
restarted run keeps comparing against the true best instead of starting over.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from safepoint import preemption
from safepoint.checkpoint import Checkpoint
from safepoint.errors import ConfigError
from safepoint.manager import CheckpointManager
from safepoint.monitor import is_better, metric_value, resolve_mode
from safepoint.policy import SavePolicy, check_save_freq
from safepoint.retention import Keep, rank_best
from safepoint.state.metrics import clean_value, is_numeric

State = Mapping[str, Any] | Callable[[], Any]
log = logging.getLogger("safepoint")


def _monitor_of(
    manager: CheckpointManager, monitor: str | None, mode: str | None
) -> tuple[str, str]:
    """This callback's monitor and mode: the manager's unless told, never against it.

    A callback that ranked by another metric (or direction) than its manager would save
    a "best" model that the manager's ``Keep(best=...)`` then deletes as not best.
    """
    if manager.monitor is None:
        return monitor or "val_loss", mode or "auto"
    if monitor is None:
        monitor = manager.monitor
    if mode is None:
        mode = str(manager.mode) if monitor == manager.monitor else "auto"
    if monitor != manager.monitor or resolve_mode(monitor, mode) != manager.mode:
        raise ConfigError(
            "ModelCheckpoint and its CheckpointManager disagree on what is best. Expected the "
            f"manager's monitor={manager.monitor!r}, mode={manager.mode!r}. Received: "
            f"monitor={monitor!r}, mode={mode!r}. Leave monitor= and mode= out to use the "
            "manager's, or create the manager with the monitor you want."
        )
    return monitor, mode


def _numeric_logs(logs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The numbers among ``logs`` as plain Python ints/floats (numpy scalars, 0-d tensors
    included, NaN kept); strings and other values are not metrics and are left out."""
    out: dict[str, Any] = {}
    for k, v in (logs or {}).items():
        try:
            value = clean_value(str(k), v)
        except ConfigError:
            continue
        if is_numeric(value):
            out[str(k)] = value
    return out


class ModelCheckpoint:
    """Save ``state`` through a manager when Keras' ModelCheckpoint would save.

    ``manager`` is a :class:`CheckpointManager` or a root path (a manager is then made
    with this callback's ``monitor``, ``mode`` and ``keep``). ``state`` is the dict to
    save, or a function returning it. ``print_fn`` receives each verbose message.
    ``monitor``/``mode`` default to the manager's (``"val_loss"``/``"auto"`` when it has
    none); a value that contradicts the manager's is a ``ConfigError``.
    """

    def __init__(
        self,
        manager: CheckpointManager | str | os.PathLike[str],
        *,
        state: State,
        monitor: str | None = None,
        mode: str | None = None,
        save_best_only: bool = False,
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        verbose: int = 0,
        keep: Keep | None = None,
        print_fn: Callable[[str], None] = print,
    ) -> None:
        check_save_freq(save_freq)
        if isinstance(manager, CheckpointManager):
            if keep is not None:
                raise ConfigError(
                    "keep= is set on the manager when a CheckpointManager is passed. Received: "
                    f"keep={keep!r}. Pass keep=... to CheckpointManager(...) instead."
                )
            monitor, mode = _monitor_of(manager, monitor, mode)
            self.mode = resolve_mode(monitor, mode)
            self.manager = manager
        else:
            monitor, mode = monitor or "val_loss", mode or "auto"
            self.mode = resolve_mode(monitor, mode)
            self.manager = CheckpointManager(manager, monitor=monitor, mode=mode, keep=keep)
        if state is None or not (isinstance(state, Mapping) or callable(state)):
            raise ConfigError(
                f"state must be the dict to checkpoint or a function returning it. Received: "
                f"state={state!r}."
            )
        self.state = state
        self.monitor = monitor
        self.save_best_only = bool(save_best_only)
        self.save_freq = save_freq
        self.verbose = verbose
        self.print_fn = print_fn
        # The decisions and messages are Keras' rules, shared with safepoint.keras.
        self.policy = SavePolicy(
            monitor=monitor,
            mode=self.mode,
            save_best_only=self.save_best_only,
            save_freq=save_freq,
            initial_value_threshold=initial_value_threshold,
        )
        # The best on disk by this callback's monitor, whatever the manager ranks by (a
        # manager made without monitor= still holds the metrics of every checkpoint).
        ranked = rank_best(self.manager.checkpoints(), monitor=monitor, mode=self.mode)
        value = metric_value(ranked[0].metrics, monitor) if ranked else None
        if value is not None and is_better(value, self.best, str(self.mode)):
            self.best = value
        latest = self.manager.latest()
        # Continue the global step of the run on disk, so a resumed run never reuses a
        # name; a restored callback state (load_state_dict) overrides this.
        self.step = latest.step if latest is not None and latest.step else 0
        self._counting = False
        self._epoch = 0
        self._last_batch: int | None = None  # to see a new epoch when no hook says so
        self._inferred = False
        self._checked_monitor = False
        self.last_saved: Checkpoint | None = None
        self._unconfirmed: float | None = None

    @property
    def best(self) -> float | None:
        """The best monitored value so far (None before the first)."""
        return self.policy.best

    @best.setter
    def best(self, value: float | None) -> None:
        self.policy.best = value

    # -- Keras-style hooks --------------------------------------------------------------
    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        """Start 0-based ``epoch``: mid-epoch checkpoints record ``epoch + 1``."""
        self._epoch = epoch
        self._last_batch = None

    def on_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> Checkpoint | None:
        """Count a batch; save when ``save_freq=N`` batches have passed.

        Also a safe point for preemption (``manager.save_on_signal``): after a signal,
        the state is saved here, between two steps, and the process exits.
        """
        self.step += 1
        self._counting = True
        self._follow_epoch(batch)
        saved = None
        if self.policy.count_batch(None):  # one call, one batch; never with save_freq="epoch"
            saved = self._maybe_save(self._epoch, logs, batch=batch)
        guard = preemption.active()
        if guard is not None:
            metrics = _numeric_logs(logs) if guard.pending else None
            guard.safe_point(step=self.step, epoch=self._epoch + 1, metrics=metrics, saved=saved)
        return saved

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> Checkpoint | None:
        """Save at the end of an epoch when ``save_freq="epoch"`` and the rules allow."""
        self._epoch = epoch
        if not self._checked_monitor:
            self._checked_monitor = True
            self._check_monitor(logs)
        saved = self._maybe_save(epoch, logs, batch=None) if self.save_freq == "epoch" else None
        guard = preemption.active()
        if guard is not None:  # a safe point too (see on_batch_end)
            guard.safe_point(
                step=self.step if self._counting else epoch + 1,
                epoch=epoch + 1,
                metrics=_numeric_logs(logs) if guard.pending else None,
                saved=saved,
            )
        # The batches that follow belong to the next epoch (on_epoch_begin may say so too).
        self._epoch = epoch + 1
        self._last_batch = None
        return saved

    def _follow_epoch(self, batch: Any) -> None:
        """Count a new epoch when the batch number restarts without an epoch hook.

        A plain loop that calls only ``on_batch_end`` would otherwise record every
        checkpoint as epoch 1. Inferring is exact within one process; across a resume
        at an epoch's last batch it cannot tell a new epoch from the rest of the old
        one, so the loop is told (once) to call ``on_epoch_begin(epoch)``.
        """
        if not isinstance(batch, int) or isinstance(batch, bool):
            return
        if self._last_batch is not None and batch < self._last_batch:
            self._epoch += 1
            if not self._inferred:
                self._inferred = True
                log.warning(
                    "safepoint: ModelCheckpoint counted a new epoch (%d) because the batch "
                    "number restarted at %d; call on_epoch_begin(epoch) at the start of each "
                    "epoch so checkpoints record the exact epoch after a resume too.",
                    self._epoch + 1,
                    batch,
                )
        self._last_batch = batch

    # -- decisions ----------------------------------------------------------------------
    def _check_monitor(self, logs: Mapping[str, Any] | None) -> None:
        needs_monitor = self.save_best_only or (self.manager.keep and self.manager.keep.best)
        if needs_monitor and self.monitor not in (logs or {}):
            raise ConfigError(
                f"ModelCheckpoint monitors {self.monitor!r} but the logs of the first epoch do "
                f"not contain it. Expected one of the logged metrics. Received: logs keys="
                f"{sorted(logs or {})}. Pass monitor= one of those (e.g. 'val_loss' needs "
                "validation data)."
            )

    def state_dict(self) -> dict[str, Any]:
        """The callback's own progress, for exact mid-epoch resumes."""
        return {
            "step": self.step,
            "batches_since_save": self.policy.state_dict()["batches_since_save"],
            "epoch": self._epoch,
            "counting": self._counting,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self._counting = bool(state.get("counting", self._counting))
        counted = int(state["batches_since_save"])
        self.policy.load_state_dict({**self.policy.state_dict(), "batches_since_save": counted})
        self._epoch = int(state["epoch"])
        self._last_batch = None  # a resumed loop numbers its batches from 0 again

    def _say(self, text: str) -> None:
        if self.verbose > 0:
            self.print_fn(text)

    def _maybe_save(
        self, epoch: int, logs: Mapping[str, Any] | None, *, batch: int | None
    ) -> Checkpoint | None:
        self._confirm()
        metrics = _numeric_logs(logs)
        step = self.step if self._counting else epoch + 1
        name = self.manager.template.format(step=step, epoch=epoch + 1, metrics=metrics)
        path = os.path.join(self.manager.storage.root, name)
        decision = self.policy.decide(epoch, metrics, path)
        self._say(decision.message)
        if not decision.save:
            self.manager.log_skip(
                step=step, epoch=epoch + 1, metrics=metrics, reason=decision.reason
            )
            return None
        state = self.state() if callable(self.state) else self.state
        started = time.perf_counter()
        ckpt = self.manager.save(state, step=step, epoch=epoch + 1, metrics=metrics)
        preemption.record_save(time.perf_counter() - started)  # for its grace-period check
        if self.manager.async_save:
            self._unconfirmed = decision.value  # accepted once the background commit is
        else:
            self.policy.accept(decision.value)
        self.last_saved = ckpt
        return ckpt

    def _confirm(self) -> None:
        """Accept the best value of an async save once it has committed.

        Waiting here costs nothing extra: the manager's next save would wait for it
        anyway, and a decision against a value no checkpoint holds could skip the best
        model. A failed background save raises here, its value never accepted.
        """
        value, self._unconfirmed = self._unconfirmed, None
        if value is not None:
            self.manager.wait()
            self.policy.accept(value)


__all__ = ["ModelCheckpoint", "State"]
