"""Snapshots for async saves: the state's tensors copied into reusable host memory.

An async save must return before its bytes are written, yet what it writes must not
change when training goes on mutating the model. So ``save()`` copies every tensor
into a *staging arena* and the background writer reads only the arena.

Why one arena, kept between saves: on these machines copying into memory that is
already touched runs at ~20 GB/s, while the first touch of fresh pages (a new
allocation each save) costs 4-30x more. The arena is allocated and touched once, then
reused by every later snapshot that fits in it, so the stall of an async save is one
``memcpy`` of the state. Tensors are placed at 64-byte-aligned offsets, so views of
any dtype are aligned.

Memory cap (``max_bytes``): a state whose tensors need more than the cap is not
snapshotted; :meth:`Staging.capture` returns None and the manager saves it
synchronously instead, logging why once. The arena grows to the largest state that
fit under the cap and is released by :meth:`Staging.release` (``close()``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .directio import aligned
from .tree import TensorLeaf

_ALIGN = 64


def default_cap() -> int:
    """Half of the machine's physical memory: room for the state and the staging copy."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def layout(leaves: Sequence[TensorLeaf]) -> tuple[list[int], int]:
    """Each leaf's offset in the arena and the bytes the arena needs."""
    offsets, position = [], 0
    for leaf in leaves:
        offsets.append(position)
        position += -(-leaf.nbytes // _ALIGN) * _ALIGN
    return offsets, position


class Staging:
    """The reusable host buffer that async snapshots are copied into.

    Not thread-safe by itself: the manager captures only after the previous save that
    read the arena has committed (at most one save in flight).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._arena: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the arena now (0 before the first snapshot)."""
        return 0 if self._arena is None else self._arena.nbytes

    def fits(self, leaves: Sequence[TensorLeaf]) -> bool:
        return layout(leaves)[1] <= self.max_bytes

    def _arena_for(self, need: int) -> np.ndarray:
        if self._arena is None or self._arena.nbytes < need:
            self._arena = None  # free the old one before touching the new one
            arena = np.frombuffer(aligned(need), dtype=np.uint8)
            arena.fill(0)  # touch every page once, here, not in each save's copy
            self._arena = arena
        return self._arena

    def capture(self, leaves: Sequence[TensorLeaf]) -> list[TensorLeaf] | None:
        """Copy every leaf into the arena; return leaves that read the copies.

        Returns None when the state is larger than ``max_bytes``.
        """
        offsets, need = layout(leaves)
        if need > self.max_bytes:
            return None
        arena = self._arena_for(need)
        out = []
        device: list[object] = []
        for leaf, offset in zip(leaves, offsets, strict=True):
            dst = arena[offset : offset + leaf.nbytes]
            _copy(leaf, dst, device)
            out.append(replace(leaf, source=dst))
        if device:
            import torch

            torch.cuda.synchronize()  # the non-blocking device->host copies have landed
        return out

    def release(self) -> None:
        self._arena = None


def _copy(leaf: TensorLeaf, dst: np.ndarray, device: list[object]) -> None:
    """Copy one leaf's bytes into ``dst`` (both copies release the GIL)."""
    source = leaf.source
    if leaf.lib == "torch" and not isinstance(source, np.ndarray):
        import torch

        src = source.detach()
        if src.numel() == 0:
            return
        if src.device.type != "cpu":
            # Device tensors: a non-blocking copy straight into the arena, one sync at
            # the end for all of them.
            view = torch.from_numpy(dst).view(src.dtype).view(src.shape)
            view.copy_(src, non_blocking=True)
            device.append(src.device)
            return
        if src.is_contiguous():
            # torch's copy runs on its intra-op threads: faster than one memcpy.
            flat = src.reshape(-1).view(torch.uint8) if src.dtype != torch.uint8 else src
            torch.from_numpy(dst).copy_(flat.reshape(-1))
            return
    np.copyto(dst, np.frombuffer(leaf.buffer(), dtype=np.uint8))
