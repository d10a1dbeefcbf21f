"""Staging for async saves: the state's tensors copied into reusable host memory.

An async save must return before its bytes are written, yet what it writes must not
change when training goes on mutating the model. So ``save()`` copies every tensor
into a *staging arena* and the background writer reads only the arena.

Why one arena, kept between saves: copying into memory that is already touched is
many times cheaper than the first touch of fresh pages, which a new allocation each
save would pay (bench/README.md). The arena is allocated and touched once (by
the first snapshot), then reused by every later snapshot that fits in it, so the stall
of an async save is one ``memcpy`` of the state.

Why the arena holds *file images*: when the payload format can say which bytes
precede a shard's tensors in its file (a safetensors header), the arena is laid out
as the files themselves: each shard starts on a page, its header, then its tensors
back to back. The background writer then hands page-aligned slices of the arena
straight to ``O_DIRECT`` writes (``payload_write.PayloadStream``) instead of copying
every byte a second time into write chunks: on 2 cores that copy was CPU taken from the
training step. Formats without such a prefix (HDF5) get the plain layout, tensors at
64-byte-aligned offsets. All copies in and out of the arena are byte copies, so a
tensor at an odd offset inside an image is never read through a typed view.

CUDA tensors: the first snapshot that holds one page-locks the arena
(``cudaHostRegister``), so their copies are non-blocking DMA transfers; the snapshot
then waits on one event per device, recorded after its copies. Where pinning is
refused the copies still work, through the driver's own bounce buffer.

Memory cap (``max_bytes``): a state whose tensors need more than the cap is not
snapshotted; :meth:`Staging.capture` returns None and the manager saves it
synchronously instead, logging why once. The arena grows to the largest state that
fit under the cap and is released by :meth:`Staging.release` (``close()``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from safepoint.state.tree import TensorLeaf
from safepoint.storage.payload_write import aligned

log = logging.getLogger("safepoint")

_ALIGN = 64
_PAGE = 4096


def default_cap() -> int:
    """Half of the machine's physical memory: room for the state and the staging copy."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def layout(leaves: Sequence[TensorLeaf]) -> tuple[list[int], int]:
    """Each leaf's offset in the plain arena layout and the bytes the arena needs."""
    offsets, position = [], 0
    for leaf in leaves:
        offsets.append(position)
        position += -(-leaf.nbytes // _ALIGN) * _ALIGN
    return offsets, position


def image_layout(
    groups: Sequence[Sequence[TensorLeaf]], prefixes: Sequence[bytes]
) -> tuple[list[tuple[int, int]], list[int], int]:
    """Where each file image and each leaf go in the arena, and the bytes it needs.

    Returns ``(images, offsets, need)``: ``images[i]`` is the ``(start, end)`` of shard
    ``i``'s file (page-aligned start), ``offsets`` every leaf's offset in group order.
    """
    images, offsets, position = [], [], 0
    for group, prefix in zip(groups, prefixes, strict=True):
        start = -(-position // _PAGE) * _PAGE
        position = start + len(prefix)
        for leaf in group:
            offsets.append(position)
            position += leaf.nbytes
        images.append((start, position))
    return images, offsets, position


@dataclass
class Snapshot:
    """What :meth:`Staging.capture` returns: the leaves reading the copies and, with
    the image layout, each shard's whole file as one page-aligned array."""

    leaves: list[TensorLeaf]
    images: list[np.ndarray] | None = None


class Staging:
    """The reusable host buffer that async snapshots are copied into.

    Not thread-safe by itself: the manager captures only after the previous save that
    read the arena has committed (at most one save in flight).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._arena: np.ndarray | None = None
        self._pinned = self._pin_tried = False

    @property
    def nbytes(self) -> int:
        """Bytes held by the arena now (0 before the first snapshot)."""
        return 0 if self._arena is None else self._arena.nbytes

    def _arena_for(self, need: int, *, pin: bool) -> np.ndarray:
        if self._arena is None or self._arena.nbytes < need:
            self.release()  # free the old one before touching the new one
            # Not touched here: the first snapshot's copy faults the pages in, on
            # torch's intra-op threads for CPU tensors, which measured about twice as
            # fast as a fill first and then the copy.
            self._arena = np.frombuffer(aligned(need), dtype=np.uint8)
        if pin and not self._pin_tried:  # once per arena: a refusal is not retried
            self._pin_tried = True
            self._pinned = _pin(self._arena)
        return self._arena

    def capture(
        self,
        groups: Sequence[Sequence[TensorLeaf]],
        prefixes: Sequence[bytes] | None = None,
    ) -> Snapshot | None:
        """Copy every leaf of ``groups`` (the payload's shards) into the arena.

        With ``prefixes`` (one per group: the bytes that precede its tensors in its
        file) the arena is laid out as the files and the snapshot carries each image;
        without, tensors are placed at aligned offsets. Returns None when the state
        needs more than ``max_bytes``.
        """
        leaves = [leaf for group in groups for leaf in group]
        if prefixes is None:
            offsets, need = layout(leaves)
            spans: list[tuple[int, int]] = []
        else:
            spans, offsets, need = image_layout(groups, prefixes)
        if need > self.max_bytes:
            return None
        arena = self._arena_for(need, pin=any(_on_device(leaf) for leaf in leaves))
        images = None
        if prefixes is not None:
            images = []
            for (start, end), prefix in zip(spans, prefixes, strict=True):
                arena[start : start + len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
                images.append(arena[start:end])
        out = []
        device: list[object] = []
        for leaf, offset in zip(leaves, offsets, strict=True):
            dst = arena[offset : offset + leaf.nbytes]
            _copy(leaf, dst, device)
            out.append(replace(leaf, source=dst))
        _wait_for_devices(device)
        return Snapshot(out, images)

    def release(self) -> None:
        if self._pinned and self._arena is not None:
            _unpin(self._arena)
        self._arena = None
        self._pinned = self._pin_tried = False


def _on_device(leaf: TensorLeaf) -> bool:
    """True for CUDA tensors: the ones whose copies pinned memory speeds up."""
    device = getattr(leaf.source, "device", None)
    return getattr(device, "type", None) == "cuda"


def _torch() -> Any:
    """torch, which the program has loaded: staging sees torch tensors only then.

    Never imported from here: safepoint's core uses a framework the program brought.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        raise RuntimeError("torch tensors are being staged but torch is not loaded")
    return torch


def _pin(arena: np.ndarray) -> bool:
    """Page-lock the arena for CUDA (``cudaHostRegister``); False where that fails.

    Device-to-host copies into pinned memory are DMA transfers that run asynchronously
    at full bus speed; into pageable memory the driver bounces them through its own
    pinned buffer and the copy blocks. Failing to pin (no CUDA, a locked-memory limit)
    only makes the snapshot slower, so it is logged, not raised.
    """
    try:
        torch = _torch()
        cudart = torch.cuda.cudart()
        ok = cudart.cudaHostRegister(arena.ctypes.data, arena.nbytes, 0) == cudart.cudaError.success
    except Exception as exc:  # any failure leaves the arena pageable, which still works
        log.info("safepoint: could not pin the staging memory (%s); copying unpinned", exc)
        return False
    if not ok:
        log.info("safepoint: cudaHostRegister refused the staging memory; copying unpinned")
    return ok


def _unpin(arena: np.ndarray) -> None:
    torch = _torch()
    try:
        torch.cuda.cudart().cudaHostUnregister(arena.ctypes.data)
    except Exception as exc:  # the memory is freed right after either way
        log.info("safepoint: could not unpin the staging memory: %s", exc)


def _copy(leaf: TensorLeaf, dst: np.ndarray, device: list[object]) -> None:
    """Copy one leaf's bytes into ``dst`` (both copies release the GIL)."""
    source = leaf.source
    if leaf.lib == "torch" and not isinstance(source, np.ndarray):
        torch = _torch()
        src = source.detach()
        if src.numel() == 0:
            return
        if src.device.type != "cpu":
            # Device tensors: a non-blocking copy of their bytes straight into the
            # arena, one event per device waited for at the end. Byte views, because
            # ``dst`` may sit at any offset inside a file image.
            if not src.is_contiguous():
                src = src.contiguous()
            flat = src.reshape(-1).view(torch.uint8) if src.dtype != torch.uint8 else src
            cuda = src.device.type == "cuda"  # other devices copy synchronously
            torch.from_numpy(dst).copy_(flat.reshape(-1), non_blocking=cuda)
            if cuda:
                device.append(src.device)
            return
        if src.is_contiguous():
            # torch's copy runs on its intra-op threads: faster than one memcpy.
            flat = src.reshape(-1).view(torch.uint8) if src.dtype != torch.uint8 else src
            torch.from_numpy(dst).copy_(flat.reshape(-1))
            return
    np.copyto(dst, np.frombuffer(leaf.buffer(), dtype=np.uint8))


def _wait_for_devices(devices: list[object]) -> None:
    """Block until the non-blocking device-to-host copies queued on ``devices`` landed.

    One event per device, recorded on its current stream after the copies: waiting
    for it covers exactly those copies, not unrelated work queued on other streams.
    """
    if not devices:
        return
    torch = _torch()
    for dev in {str(d): d for d in devices}.values():
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(dev))  # type: ignore[arg-type]
        event.synchronize()


__all__ = ["Snapshot", "Staging", "default_cap", "image_layout", "layout"]
