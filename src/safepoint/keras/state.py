"""Keras training state as a plain tree: variables, random generators, callback state.

What an exact resume of ``fit`` needs, beyond the weights Keras' own
``BackupAndRestore`` keeps:

* every model variable, including the state of the layers' seed generators (dropout
  masks are drawn from them), the optimizer's variables (step count, moments) and
  the metric accumulators (so a resumed epoch reports the same averages);
* the process-global generators (Python, NumPy, torch: :class:`safepoint.RNGState`)
  and Keras' global seed generator, when one exists;
* the state of the other callbacks that carry some: anything with ``state_dict`` /
  ``load_state_dict`` (safepoint's own callbacks), and the counters of Keras'
  ``ModelCheckpoint``, ``EarlyStopping`` and ``ReduceLROnPlateau``.

Variables are matched by position and checked by shape and dtype, not by path: Keras
numbers layer names per process (``dense_3``), so paths differ between runs of the
same script in one process while the order does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from safepoint.errors import StateMismatchError

#: Attributes that make up the progress of Keras' stateful callbacks.
_KERAS_CALLBACK_ATTRS: dict[type, tuple[str, ...]] = {
    keras.callbacks.ModelCheckpoint: (
        "best",
        "_batches_seen_since_last_saving",
        "_last_batch_seen",
        "_current_epoch",
    ),
    keras.callbacks.EarlyStopping: ("wait", "stopped_epoch", "best", "best_epoch", "best_weights"),
    keras.callbacks.ReduceLROnPlateau: ("wait", "cooldown_counter", "best"),
}


def values(variables: Sequence[Any]) -> list[np.ndarray]:
    """The current values of Keras variables as numpy arrays (copies)."""
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]


def check(variables: Sequence[Any], saved: Sequence[Any], what: str, source: str = "") -> None:
    """Check that ``saved`` arrays fit ``variables``: count, shapes and dtypes.

    ``source`` names the backup in the error. The error's advice moves the backups
    aside, never deletes a folder: the folder may hold other files (a best model).
    """
    saved = list(saved)
    problems = []
    if len(saved) != len(variables):
        problems.append(f"{len(saved)} saved values for {len(variables)} variables")
    for i, (var, value) in enumerate(zip(variables, saved, strict=False)):
        arr = np.asarray(value)
        if tuple(arr.shape) != tuple(var.shape) or str(arr.dtype) != str(var.dtype):
            problems.append(
                f"{var.path}: saved {arr.dtype!s}{list(arr.shape)}, "
                f"model {var.dtype}{list(var.shape)} (#{i})"
            )
    if problems:
        raise StateMismatchError(
            f"The backup{' ' + source if source else ''}'s {what} do not fit this model: "
            f"{'; '.join(problems[:8])}. Expected the model, optimizer and metrics the backup "
            "was made with. Build and compile them as in the interrupted run, or move the "
            "backup-* directories out of the backup folder to start over.",
            mismatched=problems,
        )


def assign(variables: Sequence[Any], saved: Sequence[Any], what: str, source: str = "") -> None:
    """Assign ``saved`` arrays to ``variables`` after :func:`check`."""
    check(variables, saved, what, source)
    for var, value in zip(variables, saved, strict=True):
        var.assign(np.asarray(value))


def global_seed_variables() -> list[Any]:
    """The state variable of Keras' global seed generator (empty if never created)."""
    from keras.src.backend.common import global_state

    generator = global_state.get_global_attribute("global_seed_generator")
    return [] if generator is None else [generator.state]


def optimizer_variables(model: Any) -> list[Any]:
    """The optimizer's variables, built first so that a fresh model has them too."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return []
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    return list(optimizer.variables)


def _plain(value: Any) -> Any:
    """A callback attribute as a value the state tree stores without pickling."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    try:
        arr = np.asarray(keras.ops.convert_to_numpy(value))
    except (TypeError, ValueError):
        return None
    return arr.item() if arr.shape == () else arr


def callback_key(index: int, callback: Any) -> str:
    return f"{index:02d}:{type(callback).__name__}"


def callback_states(callbacks: Sequence[Any]) -> dict[str, Any]:
    """The state of each stateful callback, keyed by position and class name."""
    out: dict[str, Any] = {}
    for i, cb in enumerate(callbacks):
        if callable(getattr(cb, "state_dict", None)) and callable(
            getattr(cb, "load_state_dict", None)
        ):
            out[callback_key(i, cb)] = cb.state_dict()
            continue
        for cls, attrs in _KERAS_CALLBACK_ATTRS.items():
            if isinstance(cb, cls):
                out[callback_key(i, cb)] = {a: _plain(getattr(cb, a, None)) for a in attrs}
                break
    return out


def load_callback_states(callbacks: Sequence[Any], saved: dict[str, Any]) -> list[str]:
    """Load saved callback states into ``callbacks``; return the keys that found no match."""
    unmatched = set(saved)
    for i, cb in enumerate(callbacks):
        key = callback_key(i, cb)
        if key not in saved:
            continue
        unmatched.discard(key)
        state = saved[key]
        if callable(getattr(cb, "load_state_dict", None)):
            cb.load_state_dict(state)
            continue
        for attr, value in state.items():
            if attr == "best_weights" and value is not None:
                value = [np.asarray(v) for v in value]
            setattr(cb, attr, value)
    return sorted(unmatched)


__all__ = [
    "assign",
    "callback_key",
    "callback_states",
    "check",
    "global_seed_variables",
    "load_callback_states",
    "optimizer_variables",
    "values",
]
