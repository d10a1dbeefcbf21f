"""Which way a monitored metric improves, by Keras' rules, and what counts as better."""

from __future__ import annotations

import math
from typing import Any

from safepoint.errors import ConfigError

MODES = ("auto", "min", "max")
_MAX_WORDS = (
    "acc",
    "accuracy",
    "auc",
    "precision",
    "recall",
    "f1",
    "fbeta",
    "iou",
    "r2",
    "map",
    "top_k",
)
_MIN_WORDS = (
    "loss",
    "error",
    "mae",
    "mse",
    "rmse",
    "mape",
    "msle",
    "crossentropy",
    "hinge",
    "perplexity",
    "divergence",
    "cosine_proximity",
)


def resolve_mode(monitor: str | None, mode: str) -> str | None:
    """``"min"`` or ``"max"`` for ``monitor`` (None without a monitor).

    ``mode="auto"`` follows Keras: loss-like names are minimised, accuracy-like names
    (acc, accuracy, auc, precision, recall, f1) maximised; any other name is an error
    rather than a silent guess.
    """
    if mode not in MODES:
        raise ConfigError(
            f"Unknown mode. Expected one of {MODES}. Received: mode={mode!r}. Use 'min' for "
            "metrics that should decrease (losses) and 'max' for ones that should increase."
        )
    if monitor is None:
        return None
    if not isinstance(monitor, str) or not monitor:
        raise ConfigError(f"monitor must be a metric name. Received: monitor={monitor!r}.")
    if mode != "auto":
        return mode
    base = monitor.lower().removeprefix("val_")
    words = base.replace("-", "_").split("_")
    if any(w in _MAX_WORDS for w in words) or base.startswith("fmeasure"):
        return "max"
    if any(w in _MIN_WORDS for w in words) or "loss" in base:
        return "min"
    raise ConfigError(
        f"Cannot tell whether monitor={monitor!r} should be minimised or maximised. Expected "
        "a loss-like name (loss, error, mae, mse) or an accuracy-like name (acc, accuracy, "
        f"auc, precision, recall, f1). Received: monitor={monitor!r}, mode='auto'. Pass "
        "mode='min' or mode='max'."
    )


def metric_value(metrics: dict[str, Any], monitor: str) -> float | None:
    """The monitored value as a finite float, or None (missing, NaN, inf, non-numeric)."""
    value = metrics.get(monitor)
    if isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float
        return None
    return number if math.isfinite(number) else None


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Strictly better than ``best`` (None means nothing seen yet)."""
    if best is None:
        return True
    return value < best if mode == "min" else value > best


__all__ = ["MODES", "is_better", "metric_value", "resolve_mode"]
