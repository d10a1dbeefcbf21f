"""``SavePolicy``: Keras' rules for *whether* a checkpoint is saved, and its messages.

Both ``safepoint.ModelCheckpoint`` (any training loop) and
``safepoint.keras.ModelCheckpoint`` (a Keras callback) decide through this one object,
so the two can never drift apart: every ``save_freq`` batches or every epoch; with
``save_best_only`` only when ``monitor`` strictly improves on the best so far (or on
``initial_value_threshold``); and the verbose lines are Keras 3's text, character for
character::

    Epoch 3: val_acc improved from 0.70079 to 0.70866, saving model to w.hdf5
    Epoch 4: val_acc did not improve from 0.70866
    Epoch 5: saving model to w-05.hdf5

``label`` is the metric name the user wrote (``val_acc``), ``monitor`` the key to read
from the logs (``val_accuracy`` under Keras 3), so messages speak the user's words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from safepoint.errors import ConfigError
from safepoint.monitor import is_better, metric_value


def check_save_freq(save_freq: object, *, arg: str = "save_freq") -> None:
    """Accept ``"epoch"`` or a positive int; anything else is a ``ConfigError``."""
    if save_freq == "epoch":
        return
    if isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1:
        raise ConfigError(
            f"Unrecognized {arg}. Expected 'epoch' or a positive int (save every N "
            f"batches). Received: {arg}={save_freq!r}."
        )


@dataclass
class Decision:
    """What the policy decided: save or not, and the verbose line that says so.

    ``value`` is the improved monitored value of a best-only save: pass it to
    :meth:`SavePolicy.accept` once the save has committed.
    """

    save: bool
    message: str
    reason: str = ""
    value: float | None = None


class SavePolicy:
    """Keras' ModelCheckpoint decisions, independent of any framework.

    ``mode`` must already be resolved to ``"min"`` or ``"max"`` when
    ``save_best_only`` is set (callers resolve it with their own knowledge of the
    metric, e.g. a Keras metric's direction). The object holds the best value seen
    and the batch counter, and exposes them as ``state_dict`` for exact resumes.
    """

    def __init__(
        self,
        *,
        monitor: str,
        mode: str | None,
        save_best_only: bool,
        save_freq: str | int,
        initial_value_threshold: float | None = None,
        label: str | None = None,
    ) -> None:
        check_save_freq(save_freq)
        self.monitor = monitor
        self.label = label or monitor
        self.mode = mode
        self.save_best_only = bool(save_best_only)
        self.save_freq = save_freq
        self.best: float | None = initial_value_threshold
        self._batches_since_save = 0
        self._last_batch: int | None = None

    def count_batch(self, batch: int | None) -> bool:
        """Count the batches done up to ``batch`` (0-based); True when a save is due.

        Keras' counting: ``batch`` may jump by ``steps_per_execution`` and restarts at 0
        each epoch, so the number of new batches is the difference to the last index
        seen, or ``batch + 1`` after a restart. ``batch=None`` counts exactly one batch
        (a plain training loop calls once per batch).
        """
        if self.save_freq == "epoch":
            return False
        if batch is None:
            added = 1
        elif self._last_batch is None or batch <= self._last_batch:
            added = batch + 1
        else:
            added = batch - self._last_batch
        self._batches_since_save += added
        if batch is not None:
            self._last_batch = batch
        if self._batches_since_save >= int(self.save_freq):
            self._batches_since_save = 0
            return True
        return False

    def decide(self, epoch: int, logs: Mapping[str, Any] | None, path: str) -> Decision:
        """Whether to save after 0-based ``epoch`` given ``logs``.

        ``best`` is not changed here: the caller calls :meth:`accept` only after the
        save committed, so a save that fails (now or in the background) never leaves
        ``best`` at a value no checkpoint holds, which would skip the next best epochs.
        A missing, NaN or non-numeric monitored value never counts as an improvement
        (Keras would save anyway with a warning; silently keeping a worse model is
        what best-only must never do).
        """
        prefix = f"Epoch {epoch + 1}: "
        if not self.save_best_only:
            return Decision(True, f"{prefix}saving model to {path}")
        if self.mode not in ("min", "max"):
            raise ConfigError(
                f"save_best_only needs to know whether {self.label!r} should be minimised "
                f"or maximised. Expected mode='min' or 'max'. Received: mode={self.mode!r}."
            )
        raw = (logs or {}).get(self.monitor)
        current = metric_value({self.monitor: raw}, self.monitor)
        best_str = "None" if self.best is None else f"{self.best:.5f}"
        if current is None or not is_better(current, self.best, self.mode):
            shown = _shown(raw)
            return Decision(
                False,
                f"{prefix}{self.label} did not improve from {best_str}",
                f"{self.label}={shown} not better than {best_str}",
            )
        return Decision(
            True,
            f"{prefix}{self.label} improved from {best_str} to {current:.5f}, "
            f"saving model to {path}",
            value=current,
        )

    def accept(self, value: float | None) -> None:
        """Record ``value`` (a :attr:`Decision.value`) as the best, its save committed."""
        mode = self.mode
        if value is not None and mode is not None and is_better(value, self.best, mode):
            self.best = value

    def state_dict(self) -> dict[str, Any]:
        """The best value and batch counter, for exact resumes."""
        return {
            "best": self.best,
            "batches_since_save": self._batches_since_save,
            "last_batch": self._last_batch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        best = state.get("best")
        self.best = None if best is None else float(best)
        self._batches_since_save = int(state.get("batches_since_save", 0))
        last = state.get("last_batch")
        self._last_batch = None if last is None else int(last)


def _shown(raw: Any) -> str:
    try:
        value = float(raw)
    except OverflowError:  # an int beyond float: spelled by its size, not its digits
        return f"an int of {raw.bit_length()} bits"
    except (TypeError, ValueError):
        return str(raw)
    return str(value) if math.isnan(value) else f"{value:.5f}"


__all__ = ["Decision", "SavePolicy", "check_save_freq"]
