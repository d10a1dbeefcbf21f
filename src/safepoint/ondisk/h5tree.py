"""Reading the weights of a sealed HDF5 file as a tree of numpy arrays, refusing the hostile.

:mod:`safepoint.ondisk.embedded` checks a single-file checkpoint's checksum before HDF5
parses anything; a file that passes may still have been crafted (its manifest
re-sealed): links out of the file, external or virtual storage, objects linked
twice (cycles, and "diamonds" that make a naive walk exponential), null dataspaces,
more declared bytes than the file holds, damage only HDF5 sees (a fletcher32
filter). Each is refused with ``CorruptCheckpointError`` in bounded time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from safepoint.errors import CorruptCheckpointError

_MAX_DEPTH = 64
_MAX_OBJECTS = 1 << 20  # groups and datasets in one HDF5 file: far beyond any model
_NUMERIC = "biufcS"

__all__ = ["arrays", "corrupt", "walk"]


def corrupt(name: str, why: str, *, expected: Any = None, actual: Any = None) -> Exception:
    return CorruptCheckpointError(
        f"Checkpoint file {name} is invalid: {why}. Expected {expected!r}. Received: "
        f"{actual!r}. It was damaged after it was written; restore another checkpoint "
        "(restore('latest') skips it).",
        file=name,
        expected=expected,
        actual=actual,
    )


def walk(h5: Any, name: str) -> Iterator[tuple[str, Any]]:
    """Every object below the file's root as ``(path, object)``, sorted, links refused.

    Each object is visited once, by its address in the file: a second hard link to
    one (an alias, a cycle, the "diamonds" that make a naive walk exponential) is
    refused, as Keras never writes one. ``_MAX_OBJECTS`` bounds the whole walk.
    """
    import h5py

    seen = {h5py.h5o.get_info(h5.id).addr}
    stack: list[tuple[Any, str, int]] = [(h5, "", 0)]
    while stack:
        group, prefix, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise corrupt(name, "HDF5 groups nest too deep", expected=f"<= {_MAX_DEPTH} levels")
        children = []
        for key in sorted(group.keys()):
            path = f"{prefix}{key}"
            if not isinstance(group.get(key, getlink=True), h5py.HardLink):
                raise corrupt(name, f"{path!r} is a soft or external link", expected="hard links")
            obj = group[key]
            addr = h5py.h5o.get_info(obj.id).addr
            if addr in seen:
                raise corrupt(
                    name, f"{path!r} links to an object already linked", expected="a tree"
                )
            seen.add(addr)
            if len(seen) > _MAX_OBJECTS:
                raise corrupt(name, "too many HDF5 objects", expected=f"<= {_MAX_OBJECTS}")
            yield path, obj
            if isinstance(obj, h5py.Group):
                children.append((obj, f"{path}/", depth + 1))
        stack.extend(reversed(children))


def arrays(h5: Any, name: str, budget: int) -> dict[str, Any]:
    """Every dataset as a nested dict of numpy arrays, refusing anything unsafe.

    ``budget`` bounds the bytes allocated (a dataset cannot hold more than the file),
    checked before each dataset is read. h5py reports damage it meets while reading
    (a failed fletcher32 check, a broken B-tree) as several exception types: each is
    this checkpoint's damage, so that ``restore('latest')`` can skip it.
    """
    try:
        return _h5_read(h5, name, budget)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise corrupt(name, "HDF5 structure is unreadable", actual=str(exc)[:120]) from None


def _h5_read(h5: Any, name: str, budget: int) -> dict[str, Any]:
    import h5py

    out: dict[str, Any] = {}
    total = 0
    for path, dset in walk(h5, name):
        if not isinstance(dset, h5py.Dataset):
            continue
        if dset.dtype.kind not in _NUMERIC or dset.dtype.fields:
            raise corrupt(name, f"dataset {path!r} is not numeric", actual=str(dset.dtype))
        if dset.shape is None:
            raise corrupt(name, f"dataset {path!r} has a null dataspace", expected="an array")
        if dset.external is not None or dset.is_virtual:
            raise corrupt(name, f"dataset {path!r} uses external or virtual storage")
        # Python ints: numpy's int64 product wraps for huge declared dims and could
        # slip under the budget right before the allocation below.
        total += math.prod(int(n) for n in dset.shape) * int(dset.dtype.itemsize)
        if total > budget:
            raise corrupt(name, "datasets declare more bytes than the file", expected=budget)
        data = np.empty(dset.shape, dtype=dset.dtype)
        if data.size:
            dset.read_direct(data)
        node = out
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = data[()] if data.shape == () else data
    return out
