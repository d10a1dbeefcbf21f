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

import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import preemption
from .checkpoint import Checkpoint
from .errors import ConfigError
from .manager import CheckpointManager
from .monitor import is_better, metric_value, resolve_mode
from .retention import Keep

State = Mapping[str, Any] | Callable[[], Any]


def _check_freq(save_freq: object) -> None:
    if save_freq == "epoch":
        return
    if isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1:
        raise ConfigError(
            f"Unrecognized save_freq. Expected 'epoch' or a positive int (save every N "
            f"batches). Received: save_freq={save_freq!r}."
        )


def _numeric_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (logs or {}).items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class ModelCheckpoint:
    """Save ``state`` through a manager when Keras' ModelCheckpoint would save.

    ``manager`` is a :class:`CheckpointManager` or a root path (a manager is then made
    with this callback's ``monitor``, ``mode`` and ``keep``). ``state`` is the dict to
    save, or a function returning it. ``print_fn`` receives each verbose message.
    """

    def __init__(
        self,
        manager: CheckpointManager | str | os.PathLike[str],
        *,
        state: State,
        monitor: str = "val_loss",
        mode: str = "auto",
        save_best_only: bool = False,
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        verbose: int = 0,
        keep: Keep | None = None,
        print_fn: Callable[[str], None] = print,
    ) -> None:
        _check_freq(save_freq)
        self.mode = resolve_mode(monitor, mode)
        if isinstance(manager, CheckpointManager):
            if keep is not None:
                raise ConfigError(
                    "keep= is set on the manager when a CheckpointManager is passed. Received: "
                    f"keep={keep!r}. Pass keep=... to CheckpointManager(...) instead."
                )
            self.manager = manager
        else:
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
        self.best: float | None = initial_value_threshold
        if self.manager.monitor == monitor:
            on_disk = self.manager.best()
            value = None if on_disk is None else metric_value(on_disk.metrics, monitor)
            if value is not None and is_better(value, self.best, str(self.mode)):
                self.best = value
        latest = self.manager.latest()
        # Continue the global step of the run on disk, so a resumed run never reuses a
        # name; a restored callback state (load_state_dict) overrides this.
        self.step = latest.step if latest is not None and latest.step else 0
        self._counting = False
        self._batches_since_save = 0
        self._epoch = 0
        self._checked_monitor = False
        self.last_saved: Checkpoint | None = None

    # -- Keras-style hooks --------------------------------------------------------------
    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> Checkpoint | None:
        """Count a batch; save when ``save_freq=N`` batches have passed.

        Also a safe point for preemption (``manager.save_on_signal``): after a signal,
        the state is saved here, between two steps, and the process exits.
        """
        self.step += 1
        self._counting = True
        saved = None
        if self.save_freq != "epoch":
            self._batches_since_save += 1
            if self._batches_since_save >= int(self.save_freq):
                self._batches_since_save = 0
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
        return saved

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
            "batches_since_save": self._batches_since_save,
            "epoch": self._epoch,
            "counting": self._counting,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self._counting = bool(state.get("counting", self._counting))
        self._batches_since_save = int(state["batches_since_save"])
        self._epoch = int(state["epoch"])

    def _say(self, text: str) -> None:
        if self.verbose > 0:
            self.print_fn(text)

    def _maybe_save(
        self, epoch: int, logs: Mapping[str, Any] | None, *, batch: int | None
    ) -> Checkpoint | None:
        metrics = _numeric_logs(logs)
        step = self.step if self._counting else epoch + 1
        name = self.manager.template.format(step=step, epoch=epoch + 1, metrics=metrics)
        path = os.path.join(self.manager.storage.root, name)
        prefix = f"Epoch {epoch + 1}: "
        if self.save_best_only:
            current = metric_value(metrics, self.monitor)
            best_str = "None" if self.best is None else f"{self.best:.5f}"
            raw = metrics.get(self.monitor)
            if current is None or not is_better(current, self.best, str(self.mode)):
                shown = f"{raw:.5f}" if raw is not None and not math.isnan(raw) else str(raw)
                self._say(f"{prefix}{self.monitor} did not improve from {best_str}")
                self.manager.log_skip(
                    step=step,
                    epoch=epoch + 1,
                    metrics=metrics,
                    reason=f"{self.monitor}={shown} not better than {best_str}",
                )
                return None
            self._say(
                f"{prefix}{self.monitor} improved from {best_str} to {current:.5f}, "
                f"saving model to {path}"
            )
            self.best = current
        else:
            self._say(f"{prefix}saving model to {path}")
        state = self.state() if callable(self.state) else self.state
        started = time.perf_counter()
        ckpt = self.manager.save(state, step=step, epoch=epoch + 1, metrics=metrics)
        preemption.record_save(time.perf_counter() - started)  # for its grace-period check
        self.last_saved = ckpt
        return ckpt
