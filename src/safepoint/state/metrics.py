"""Metrics as user data: any str name and any number round-trip through a manifest.

Metrics come from the wild (``logs`` of a framework, ``np.mean`` of a diverged loss, a
learning rate logged as ``"$lr"``), so they get their own small codec instead of the
state tree's: the tree reads every ``$`` key as a tag, which made a metric named
``$lr`` hide its checkpoint and one named ``$float`` break every listing.

On disk (``"metrics"`` in the manifest) they are a JSON object of name -> value, or,
when a name starts with ``$``, ``{"$dict": [[name, value], ...]}`` (which readers of the
older encoding also decode correctly). A value is a JSON number, bool, string or null,
or one of two tags: ``{"$float": "nan" | "inf" | "-inf" | "-0.0"}`` and
``{"$int": "<hex>"}`` for an int too large for JSON readers.

Reading is lenient where the old writer was wrong (a ``$`` name stored as a plain key,
a numpy ``repr`` such as ``np.float64(nan)`` in a ``$float`` tag) and strict otherwise:
anything else raises :class:`MetricsError`, and the manifest reader then lists the
checkpoint without its metrics rather than not at all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from safepoint.errors import ConfigError
from safepoint.state.tree import is_torch_tensor

_BIG_INT_BITS = 4096
_MAX_HEX = _BIG_INT_BITS * 64  # the state tree's bound on a $int tag
_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "-0.0": -0.0}
# What the old writer spelled for numpy floats: repr(np.float64(nan)) == "np.float64(nan)".
_NUMPY_REPR = re.compile(r"(?:np|numpy)\.\w+\((nan|inf|-inf|-0\.0)\)")


class MetricsError(ValueError):
    """A manifest's metrics object that no safepoint writer produced."""


# ---------------------------------------------------------------------------- values
def clean_value(name: str, value: Any) -> Any:
    """``value`` as a plain Python scalar (None, bool, int, float or str).

    numpy scalars, one-element arrays and tensors become the Python number they hold
    (ints stay ints, bools stay bools); anything else with ``__index__``/``__float__``
    is converted through it. Complex numbers and other objects are a ``ConfigError``.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)  # np.str_ too
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int) or (
        isinstance(value, np.integer) and not isinstance(value, np.timedelta64)
    ):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)  # np.longdouble is rounded to the nearest float
    if isinstance(value, complex | np.complexfloating):
        raise ConfigError(
            f"Metric {name!r} must be a real number. Received: complex {value!r}. Log its "
            "real part, abs() or both as two metrics."
        )
    if isinstance(value, np.ndarray) or is_torch_tensor(value):
        size = value.size if isinstance(value, np.ndarray) else value.numel()
        if size == 1:
            return clean_value(name, value.item())
        raise ConfigError(
            f"Metric {name!r} must be a number. Received: an array of shape "
            f"{tuple(value.shape)}. Log one number (e.g. .mean().item())."
        )
    try:
        if isinstance(value, np.generic):  # datetime64, timedelta64, void, bytes_...
            raise TypeError(type(value).__name__)
        if hasattr(value, "__index__"):
            return int(value.__index__())
        return float(value)  # Decimal, Fraction, objects with __float__
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"Metric {name!r} must be a number. Received: {type(value).__name__} {value!r}. "
            "Log numbers only, or convert the value with float()."
        ) from None


def is_numeric(value: Any) -> bool:
    """True for a cleaned value that is a number (bool excluded)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


# -------------------------------------------------------------------------- encoding
def _encode_value(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return {"$float": "nan"}
        if math.isinf(value):
            return {"$float": "inf" if value > 0 else "-inf"}
        if value == 0.0 and math.copysign(1.0, value) < 0:
            return {"$float": "-0.0"}
        return float(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return {"$int": hex(value)} if value.bit_length() > _BIG_INT_BITS else int(value)
    return value


def encode(metrics: Mapping[str, Any]) -> Any:
    """The manifest's ``metrics`` value (values cleaned again: a Manifest may be built
    by code other than ``save``)."""
    pairs = [(str(k), _encode_value(clean_value(str(k), v))) for k, v in metrics.items()]
    if any(k.startswith("$") for k, _ in pairs):
        return {"$dict": [[k, v] for k, v in pairs]}
    return dict(pairs)


# -------------------------------------------------------------------------- decoding
def _decode_value(name: str, node: Any) -> Any:
    if node is None or isinstance(node, bool | str | int | float):
        return node
    if isinstance(node, dict) and len(node) == 1:
        ((tag, text),) = node.items()
        if tag == "$float" and isinstance(text, str):
            match = _NUMPY_REPR.fullmatch(text)
            spelled = match.group(1) if match else text
            if spelled in _SPECIAL:
                return _SPECIAL[spelled]
        if tag == "$int" and isinstance(text, str) and len(text) <= _MAX_HEX:
            try:
                return int(text, 16)
            except ValueError:
                pass
    raise MetricsError(f"metric {name!r} has a value no safepoint writer produces: {node!r:.80}")


def decode(node: Any) -> dict[str, Any]:
    """Metrics from the manifest's ``metrics`` value; ``MetricsError`` if it is damaged."""
    if not isinstance(node, dict):
        raise MetricsError(f"metrics must be a JSON object, not {type(node).__name__}")
    if list(node) == ["$dict"] and isinstance(node["$dict"], list):
        pairs = node["$dict"]
    else:
        pairs = [[k, v] for k, v in node.items()]  # old manifests: "$" names as plain keys
    out: dict[str, Any] = {}
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise MetricsError(f"bad metrics entry {pair!r:.80}")
        if pair[0] in out:
            raise MetricsError(f"duplicate metric {pair[0]!r:.80}")
        out[pair[0]] = _decode_value(pair[0], pair[1])
    return out


__all__ = ["MetricsError", "clean_value", "decode", "encode", "is_numeric"]
