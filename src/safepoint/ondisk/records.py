"""What a valid tensor record holds, in a manifest or a tree zip's state.

A record names a tensor's dtype, shape and lib, and where its bytes are: a file of the
checkpoint and a name inside it, or (a multi-rank save) its chunks. Each check returns
what is wrong as ``(why, received)`` rather than raising, so each container reports it
against its own file (``manifest.json``, or the ``.ckpt`` the state sits in).
"""

from __future__ import annotations

import math
from typing import Any

from safepoint.ondisk import chunks
from safepoint.state import dtypes

#: What may hold a tensor: numpy arrays and scalars, torch tensors.
LIBS = ("numpy", "numpy-scalar", "torch")
#: Dimensions of a tensor, at most (numpy's own limit).
MAX_DIMS = 64


def layout_problem(key: Any, entry: dict[str, Any]) -> tuple[str, Any] | None:
    """What is wrong with a record's shape and lib; None when sound."""
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)
    ):
        return f"tensor {key!r} shape must be a list of non-negative ints", shape
    if entry.get("lib") not in LIBS:
        return f"tensor {key!r} lib must be one of {LIBS}", entry.get("lib")
    if entry["lib"] == "numpy-scalar" and shape:
        return f"tensor {key!r} is a scalar with a shape", shape
    return None


def tensor_problem(
    key: Any, entry: Any, files: dict[str, Any], where: str
) -> tuple[str, Any] | None:
    """What is wrong with a manifest's record of tensor ``key`` (its dtype is looked up,
    which raises for an unknown one); None when sound."""
    if not isinstance(entry, dict):
        return "tensor entries must be objects", entry
    if chunks.is_chunked(entry):
        dt = dtypes.lookup(entry.get("dtype"), where=f"{where} tensor {key!r}")
        problem = layout_problem(key, entry)
        if problem is not None:
            return problem
        why = chunks.problem(entry, files, dt.itemsize)
        return None if why is None else (f"tensor {key!r}: {why}", entry.get(chunks.KEY))
    if not isinstance(entry.get("file"), str) or entry["file"] not in files:
        return f"tensor {key!r} lives in an unlisted file", entry.get("file")
    if not isinstance(entry.get("name"), str):
        return f"tensor {key!r} needs a name inside its file", entry.get("name")
    dtypes.lookup(entry.get("dtype"), where=f"{where} tensor {key!r}")
    return layout_problem(key, entry)


def tensor_nbytes(entry: dict[str, Any]) -> int:
    return math.prod(entry["shape"]) * dtypes.BY_NAME[entry["dtype"]].itemsize


__all__ = ["LIBS", "MAX_DIMS", "layout_problem", "tensor_nbytes", "tensor_problem"]
