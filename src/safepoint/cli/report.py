"""``safepoint diff``: how one checkpoint differs from another.

Reads only verified data and imports no framework. Checkpoint directories are compared
tensor by tensor from their payloads (bfloat16 and float8 through their raw bytes when
numpy cannot spell them); single-file checkpoints (Keras ``.keras``, ``.h5``,
``.weights.h5``) through the weights the file holds, keyed by their HDF5 path, so two
files with different weights never compare equal because their manifests list no
tensors. The result is a list of :class:`Change` records, printed as lines or as JSON.

A writer may re-save a name while it is compared (``latest``, ``weights.best.h5``):
each side is read through :func:`safepoint.catalog.reader.read_raw` or :func:`read_weights`,
which give the manifest and the data of one version, never a manifest of one and
payloads of the next.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from safepoint import formats
from safepoint.catalog import reader, singlefile
from safepoint.errors import IncompatibleCheckpointError
from safepoint.ondisk.manifest import Manifest
from safepoint.storage.local import Storage

__all__ = ["Change", "diff", "flatten_arrays", "read_weights", "weights", "weights_tree"]


@dataclass(frozen=True)
class Change:
    """One difference. ``kind``: tensor, state, metric or step; ``change``: only_in_a,
    only_in_b, dtype_shape, values, bytes or value."""

    kind: str
    key: str
    change: str
    a: Any = None
    b: Any = None
    changed: int | None = None
    size: int | None = None
    max_abs_diff: float | None = None

    def line(self, name_a: str, name_b: str) -> str:
        if self.change == "only_in_a":
            return f"- {self.kind} {self.key} (only in {name_a})"
        if self.change == "only_in_b":
            return f"+ {self.kind} {self.key} (only in {name_b})"
        if self.change == "dtype_shape":
            return f"~ tensor {self.key}: {self.a} -> {self.b}"
        if self.change == "values":
            return (
                f"~ tensor {self.key}: {self.changed} of {self.size} values differ, "
                f"max |a-b| = {self.max_abs_diff:.6g}"
            )
        if self.change == "bytes":
            return f"~ tensor {self.key}: bytes differ"
        if self.kind == "state":
            return (
                f"~ {self.key} differs ({self.a} -> {self.b})"
                if self.a
                else ("~ non-tensor state differs (step counters, settings or structure)")
            )
        if self.kind == "step":
            return f"~ step/epoch: {self.a} -> {self.b}"
        return f"~ {self.kind} {self.key}: {self.a} -> {self.b}"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def flatten_arrays(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"layers/dense/vars/0": array}`` from the nested dicts a single file reads as."""
    out: dict[str, np.ndarray] = {}
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree)
    for key, value in items:
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping | list | tuple):
            out.update(flatten_arrays(value, path))
        else:
            out[path] = np.asarray(value)
    return out


def read_weights(storage: Storage, name: str) -> tuple[Manifest, Any]:
    """The manifest and verified weights (nested dicts) of single-file checkpoint
    ``name``, both read through one descriptor, so from one version even while a
    writer replaces the file.

    Listing and verifying a single file needs no h5py; reading its weights does. Its
    absence is this process's limit, not damage: ``IncompatibleCheckpointError``.
    """
    try:
        return singlefile.read_checkpoint(storage, name)
    except ImportError as exc:
        raise _needs_h5py(name, exc) from None


def weights_tree(storage: Storage, name: str, found: Manifest) -> Any:
    """The verified weights of single-file checkpoint ``name`` as nested dicts.

    The file is opened again: a writer may have replaced it since ``found`` was read.
    Use :func:`read_weights` to read both from one version.
    """
    try:
        return singlefile.read_state(storage, name, found)
    except ImportError as exc:
        raise _needs_h5py(name, exc) from None


def _needs_h5py(name: str, exc: ImportError) -> IncompatibleCheckpointError:
    return IncompatibleCheckpointError(
        f"Reading the weights of {name} needs h5py, which is not installed. Expected "
        f"h5py importable. Received: {exc}. Install it: pip install 'safepoint[hdf5]'."
    )


def weights(storage: Storage, name: str, found: Manifest) -> dict[str, np.ndarray]:
    """The verified weights of single-file checkpoint ``name``, by HDF5 path (see
    :func:`weights_tree`)."""
    return flatten_arrays(weights_tree(storage, name, found))


@dataclass
class _Side:
    """One checkpoint, reduced to what diff compares."""

    name: str
    found: Manifest
    entries: dict[str, tuple[str, list[int]]]  # key -> (dtype, shape)
    raw: Callable[[str], np.ndarray]  # bytes-level view, for equality
    numeric: Callable[[str], np.ndarray | None]
    state: str  # the non-tensor state, as canonical JSON
    layout: str


def _bytes_of(arr: np.ndarray) -> np.ndarray:
    try:
        return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    except (TypeError, ValueError):  # object arrays (variable-length strings)
        return np.frombuffer(repr(arr.tolist()).encode(), np.uint8)


def _as_number(arr: np.ndarray) -> np.ndarray | None:
    if arr.dtype.kind in "biufc":
        return arr
    try:
        return arr.astype(np.float64)
    except (TypeError, ValueError):
        return None


def _load(storage: Storage, name: str) -> _Side:
    if singlefile.is_single_file(storage, name):
        found, tree = read_weights(storage, name)
        arrays = flatten_arrays(tree)
        record = found.extra[singlefile.KEY]
        return _Side(
            name,
            found,
            {k: (str(v.dtype), list(v.shape)) for k, v in arrays.items()},
            lambda k: _bytes_of(arrays[k]),
            lambda k: _as_number(arrays[k]),
            "",
            f"{record.get('container')}/{record.get('layout')}",
        )
    found, raw = reader.read_raw(storage, name)

    def numeric(key: str) -> np.ndarray | None:
        try:
            value = formats.materialize(found.tensors[key], raw[key], as_numpy=True)
        except Exception:  # a dtype numpy cannot spell: compared by bytes
            return None
        return _as_number(np.asarray(value))

    return _Side(
        name,
        found,
        {k: (str(e["dtype"]), list(e["shape"])) for k, e in found.tensors.items()},
        lambda k: raw[k],
        numeric,
        json.dumps(_strip_refs(found.tree), sort_keys=True, default=str),
        "directory",
    )


def _tensor_change(key: str, a: _Side, b: _Side) -> Change | None:
    ea, eb = a.entries[key], b.entries[key]
    if ea != eb:
        return Change("tensor", key, "dtype_shape", f"{ea[0]}{ea[1]}", f"{eb[0]}{eb[1]}")
    ra, rb = a.raw(key), b.raw(key)
    if np.array_equal(ra, rb):
        return None
    va, vb = a.numeric(key), b.numeric(key)
    if va is None or vb is None or not va.size:
        return Change("tensor", key, "bytes")
    wide = np.complex128 if "c" in (va.dtype.kind, vb.dtype.kind) else np.float64
    delta = np.abs(va.astype(wide) - vb.astype(wide))
    rows = ra.reshape(va.size, -1) != rb.reshape(vb.size, -1)
    biggest = float(np.nanmax(delta)) if delta.size and not np.isnan(delta).all() else math.nan
    return Change(
        "tensor",
        key,
        "values",
        changed=int(rows.any(axis=1).sum()),
        size=int(va.size),
        max_abs_diff=biggest,
    )


def diff(storage_a: Storage, name_a: str, storage_b: Storage, name_b: str) -> list[Change]:
    """How checkpoint ``b`` differs from ``a`` (empty when identical)."""
    a, b = _load(storage_a, name_a), _load(storage_b, name_b)
    out: list[Change] = []
    for key in sorted(set(a.entries) - set(b.entries)):
        out.append(Change("tensor", key, "only_in_a"))
    for key in sorted(set(b.entries) - set(a.entries)):
        out.append(Change("tensor", key, "only_in_b"))
    for key in sorted(set(a.entries) & set(b.entries)):
        change = _tensor_change(key, a, b)
        if change is not None:
            out.append(change)
    if a.layout != b.layout:
        out.append(Change("state", "layout", "value", a.layout, b.layout))
    elif a.state != b.state:
        out.append(Change("state", "state", "value"))
    ma, mb = a.found.metrics, b.found.metrics
    for key in sorted(set(ma) | set(mb)):
        va, vb = ma.get(key), mb.get(key)
        if va != vb and not (_isnan(va) and _isnan(vb)):
            out.append(Change("metric", key, "value", va, vb))
    if (a.found.step, a.found.epoch) != (b.found.step, b.found.epoch):
        out.append(
            Change(
                "step",
                "step/epoch",
                "value",
                f"{a.found.step}/{a.found.epoch}",
                f"{b.found.step}/{b.found.epoch}",
            )
        )
    return out


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _strip_refs(node: Any) -> Any:
    if isinstance(node, dict):
        if "$tensor" in node:
            return "<tensor>"
        return {k: _strip_refs(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_strip_refs(v) for v in node]
    return node
