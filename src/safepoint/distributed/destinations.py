"""Live tensors as read destinations: a restore reads straight into their memory.

A rank restoring onto the world size it saved from (or any box that maps onto whole
saved chunks) needs no intermediate buffer: its live local shard is exactly the box it
reads. :func:`live_bytes` hands out that shard's memory as a flat ``uint8`` array when
it can be written in place (a CPU tensor or numpy array, contiguous, of the saved dtype
and size); anything else (a GPU tensor, another dtype, a strided view) is read into
fresh memory and copied, as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from safepoint.state import dtypes


def live_bytes(target: Any, entry: dict[str, Any], sizes: Sequence[int]) -> np.ndarray | None:
    """``target``'s memory as flat writable ``uint8`` when the box ``sizes`` of ``entry``
    can be read into it in place; None otherwise."""
    count = math.prod(sizes)
    if count == 0:
        return None
    if isinstance(target, torch.Tensor):
        dt = dtypes.from_torch(target.dtype)
        if (
            entry["lib"] != "torch"
            or dt is None
            or dt.name != entry["dtype"]
            or target.device.type != "cpu"
            or list(target.shape) != list(sizes)
            or not target.is_contiguous()
            or target.is_sparse
        ):
            return None
        flat = target.detach().reshape(-1)
        if flat.numel() == 1 and flat.stride(0) != 1:
            return None  # a one-element view with another stride: view() refuses it
        return flat.view(torch.uint8).numpy()
    if isinstance(target, np.ndarray):
        found = dtypes.from_numpy(target.dtype)
        if (
            entry["lib"] != "numpy"
            or found is None
            or found.name != entry["dtype"]
            or target.dtype.byteorder == ">"
            or list(target.shape) != list(sizes)
            or not target.flags.c_contiguous
            or not target.flags.writeable
        ):
            return None
        return target.reshape(-1).view(np.uint8)
    return None


def fits(target: Any, loaded: Any) -> None:
    """Raise the ``StateMismatchError`` that ``restore_into(strict=True)`` would, before
    any live tensor is written; return when ``loaded`` fits ``target``."""
    from safepoint.state.loading import _compare, _Problems, restore_into

    problems = _Problems()
    _compare(target, loaded, "", problems)
    if problems:
        restore_into(target, loaded, strict=True)  # raises, loading nothing


__all__ = ["fits", "live_bytes"]
