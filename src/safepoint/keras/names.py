"""Metric names: Keras 2's ``acc``/``val_acc`` as aliases of Keras 3's ``accuracy``.

Keras 2 logged accuracy as ``acc``; Keras 3 logs ``accuracy``, so Keras 2 code that
monitors ``val_acc`` or names files ``{val_acc:.2f}`` silently never sees its metric.
safepoint reads the Keras 3 value under the old name, where the logs lack the old name
itself, and keeps the user's spelling in messages and file names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

ALIASES = {"acc": "accuracy", "val_acc": "val_accuracy"}


def canonical(name: str) -> str:
    """The Keras 3 log key for ``name`` (``val_acc`` -> ``val_accuracy``)."""
    return ALIASES.get(name, name)


def key(name: str, logged: Mapping[str, Any]) -> str:
    """The log key that holds ``name``: itself when logged, else its Keras 3 name.

    The alias applies only where the logs lack the name as given: a model compiled
    with a metric *named* ``"acc"`` logs ``acc``/``val_acc``, and those are read as
    they are.
    """
    if name in logged or canonical(name) not in logged:
        return name
    return canonical(name)


def aliased_in(names: Iterable[str], logged: Mapping[str, Any]) -> list[str]:
    """The Keras 2 names among ``names`` that ``logged`` holds only under the new name."""
    out: list[str] = []
    for name in names:
        if name in ALIASES and key(name, logged) != name and name not in out:
            out.append(name)
    return out


def numeric(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric entries of Keras logs as floats, under the names Keras logged them.

    These are what a checkpoint's manifest records: each metric once (no ``acc`` copy
    of ``accuracy``), so listings, plots and ``Keep(best=...)`` see one series each.
    """
    out: dict[str, float] = {}
    for k, value in (logs or {}).items():
        try:
            out[str(k)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def aliased(values: Mapping[str, float]) -> dict[str, float]:
    """``values`` plus each Keras 2 name the logs lack, read from its Keras 3 name.

    For the user's words only (the monitor, the filename template); a model that
    really logs ``acc`` keeps its own value.
    """
    out = dict(values)
    for old, new in ALIASES.items():
        if new in out and old not in out:
            out[old] = out[new]
    return out


def notice(names: list[str]) -> str:
    """The one-time notice that Keras 2 names are being read as Keras 3 ones."""
    pairs = ", ".join(f"{n!r} -> {canonical(n)!r}" for n in names)
    return (
        f"safepoint.keras.ModelCheckpoint: {pairs} are Keras 2 metric names that these "
        "logs do not hold; Keras 3 logs them under the new names, which safepoint reads "
        "for them (messages and file names keep your spelling). Rename them in your code "
        "to silence this notice."
    )


__all__ = ["ALIASES", "aliased", "aliased_in", "canonical", "key", "notice", "numeric"]
