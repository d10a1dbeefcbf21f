"""Metric names: Keras 2's ``acc``/``val_acc`` as aliases of Keras 3's ``accuracy``.

Keras 2 logged accuracy as ``acc``; Keras 3 logs ``accuracy``, so Keras 2 code that
monitors ``val_acc`` or names files ``{val_acc:.2f}`` silently never sees its metric.
safepoint reads the Keras 3 value under the old name and keeps the user's spelling in
messages and file names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

ALIASES = {"acc": "accuracy", "val_acc": "val_accuracy"}


def canonical(name: str) -> str:
    """The Keras 3 log key for ``name`` (``val_acc`` -> ``val_accuracy``)."""
    return ALIASES.get(name, name)


def legacy_in(names: Iterable[str]) -> list[str]:
    """The Keras 2 names among ``names``, in order, once each."""
    out: list[str] = []
    for name in names:
        if name in ALIASES and name not in out:
            out.append(name)
    return out


def numeric(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric entries of Keras logs as floats, Keras 2 aliases added.

    An alias is added only when the Keras 3 name is logged and the old one is not, so
    a model that really logs ``acc`` keeps its own value.
    """
    out: dict[str, float] = {}
    for key, value in (logs or {}).items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    for old, new in ALIASES.items():
        if new in out and old not in out:
            out[old] = out[new]
    return out


def notice(names: list[str]) -> str:
    """The one-time notice that Keras 2 names are being read as Keras 3 ones."""
    pairs = ", ".join(f"{n!r} -> {canonical(n)!r}" for n in names)
    return (
        f"safepoint.keras.ModelCheckpoint: {pairs} are Keras 2 metric names; Keras 3 "
        "logs them under the new names, which safepoint reads for them (messages and file "
        "names keep your spelling). Rename them in your code to silence this notice."
    )
