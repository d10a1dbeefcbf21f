"""Reading chunked tensors (multi-rank saves): whole tensors or one rank's box of them.

The manifest has validated every chunk's box and byte range (:mod:`safepoint.ondisk.chunks`)
before anything here runs, so allocations are bounded by the declared shapes, which the
payload files' sizes bound in turn. Each chunk read is checked against its own xxh3: a
rank restoring a box reads, and verifies, only the chunks that overlap it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from safepoint.errors import CorruptCheckpointError
from safepoint.ondisk import checksum, chunks
from safepoint.ondisk.manifest import Manifest
from safepoint.state import dtypes
from safepoint.storage import parallel
from safepoint.storage.local import Storage


def chunked_keys(found: Manifest) -> list[str]:
    """Keys of the manifest's chunked tensors."""
    return [k for k, e in found.tensors.items() if chunks.is_chunked(e)]


def without_chunked(found: Manifest) -> Manifest:
    """``found`` with only the tensors and files a payload format reads itself."""
    from dataclasses import replace

    used = {c["file"] for e in found.tensors.values() if chunks.is_chunked(e) for c in e["chunks"]}
    return replace(
        found,
        tensors={k: e for k, e in found.tensors.items() if not chunks.is_chunked(e)},
        files={f: i for f, i in found.files.items() if f not in used},
    )


#: Bytes read (and hashed) per call: small enough that the hash reads them back from the
#: CPU cache, large enough that the calls cost nothing next to the copy.
_BLOCK = 4 << 20
#: Threads reading one rank's chunks: reads of different files (or ranges) overlap on
#: storage that serves several requests at once; hashing holds the GIL, reading not.
READERS = 4

#: A read of one chunk (or part of it) into its place; run by :func:`run_reads`.
Read = Callable[[], None]


def _fileno(f: Any) -> int | None:
    try:
        return int(f.fileno())
    except (AttributeError, OSError, ValueError):  # an object store's reader has no fd
        return None


def fill(storage: Storage, name: str, chunk: dict[str, Any], dest: memoryview) -> None:
    """Read chunk ``chunk``'s bytes into ``dest`` (its exact size) and verify its xxh3.

    Positional reads (``preadv``) go straight into ``dest``, which may be a live
    tensor's memory, and each block is hashed right after it lands, while it is still
    in the CPU cache: one pass over the bytes, no intermediate buffer.
    """
    relpath = f"{name}/{chunk['file']}"
    begin, end = int(chunk["begin"]), int(chunk["end"])
    hasher = checksum.Hasher()
    got = 0
    with storage.open_read(relpath) as f:
        fd = _fileno(f)
        if fd is None:
            f.seek(begin)
        readinto = getattr(f, "readinto", None)
        while got < len(dest):
            piece = dest[got : got + _BLOCK]
            if fd is not None:
                n = os.preadv(fd, [piece], begin + got)
            elif readinto is not None:
                n = readinto(piece)
            else:
                data = f.read(len(piece))
                piece[: len(data)] = data
                n = len(data)
            if not n:
                break
            hasher.update(dest[got : got + n])
            got += n
    if got != end - begin:
        raise CorruptCheckpointError(
            f"{relpath} ended early. Expected bytes {begin}-{end}. Received: {got} "
            "bytes. Restore another checkpoint (restore('latest') skips this one).",
            file=relpath,
            expected=end - begin,
            actual=got,
        )
    checksum.check(
        f"{relpath} (bytes {begin}-{end})",
        expected=chunk[checksum.ALGORITHM],
        actual=hasher.hexdigest(),
    )


def read_chunk(storage: Storage, name: str, chunk: dict[str, Any]) -> np.ndarray:
    """One chunk's verified bytes (writable: torch takes them without a copy)."""
    # Bounded by the file's size (validated manifest); not zero-filled: every byte is
    # read into it, or the read fails.
    data = np.empty(int(chunk["end"]) - int(chunk["begin"]), dtype=np.uint8)
    fill(storage, name, chunk, data.data)
    return data


def _overlap(
    offsets: Sequence[int], sizes: Sequence[int], co: Sequence[int], cs: Sequence[int]
) -> tuple[list[int], list[int]] | None:
    lo = [max(a, b) for a, b in zip(offsets, co, strict=True)]
    hi = [min(a + x, b + y) for a, x, b, y in zip(offsets, sizes, co, cs, strict=True)]
    return None if any(h <= low for low, h in zip(lo, hi, strict=True)) else (lo, hi)


def box_reads(
    storage: Storage,
    name: str,
    entry: dict[str, Any],
    offsets: Sequence[int],
    sizes: Sequence[int],
    dest: np.ndarray,
) -> list[Read]:
    """The reads that fill ``dest`` (the box's bytes, row-major, flat ``uint8``).

    A chunk that lies whole inside the box and is one contiguous run of ``dest`` (the
    same world size, or shards split along the first dimension) is read straight into
    its place; a chunk the box only partly overlaps is read whole into fresh memory
    (its checksum covers all of it) and the overlap copied. The reads write disjoint
    bytes of ``dest``: they may run in any order, on any threads.
    """
    item = dtypes.BY_NAME[entry["dtype"]].itemsize
    if math.prod(sizes) == 0:
        return []
    row = math.prod(sizes[1:]) * item
    grid = dest.view(np.dtype(f"V{item}")).reshape(tuple(sizes))
    reads: list[Read] = []
    for chunk in entry[chunks.KEY]:
        co, cs = chunk["offsets"], chunk["sizes"]
        found = _overlap(offsets, sizes, co, cs)
        if found is None:
            continue
        lo, hi = found
        inside = lo == list(co) and [h - low for low, h in zip(lo, hi, strict=True)] == list(cs)
        if inside and list(cs[1:]) == list(sizes[1:]):
            start = (co[0] - offsets[0]) * row if sizes else 0
            place = dest[start : start + int(chunk["end"]) - int(chunk["begin"])]

            def whole(chunk: dict[str, Any] = chunk, place: np.ndarray = place) -> None:
                fill(storage, name, chunk, place.data)

            reads.append(whole)
            continue
        src = tuple(slice(low - b, h - b) for low, h, b in zip(lo, hi, co, strict=True))
        dst = tuple(slice(low - b, h - b) for low, h, b in zip(lo, hi, offsets, strict=True))

        def partial(chunk: dict[str, Any] = chunk, src: Any = src, dst: Any = dst) -> None:
            data = read_chunk(storage, name, chunk).view(grid.dtype).reshape(chunk["sizes"])
            grid[dst] = data[src]

        reads.append(partial)
    return reads


def run_reads(reads: Sequence[Read], threads: int = READERS) -> None:
    """Run ``reads``, several at a time; raise the first failure after all have ended."""
    parallel.run_all(reads, threads)


def read_box(
    storage: Storage,
    name: str,
    entry: dict[str, Any],
    offsets: Sequence[int],
    sizes: Sequence[int],
) -> np.ndarray:
    """The box ``offsets``/``sizes`` of a chunked tensor, as raw bytes (``uint8``, flat)."""
    item = dtypes.BY_NAME[entry["dtype"]].itemsize
    # Not zero-filled: the validated chunks cover the tensor exactly, so every byte of
    # the box is read into it, or the read fails.
    out = np.empty(math.prod(sizes) * item, dtype=np.uint8)
    run_reads(box_reads(storage, name, entry, offsets, sizes, out), threads=1)
    return out


def read_whole(storage: Storage, name: str, found: Manifest) -> dict[str, np.ndarray]:
    """Every chunked tensor of ``found`` assembled whole (one process reading it all)."""
    out: dict[str, np.ndarray] = {}
    for key in chunked_keys(found):
        entry = found.tensors[key]
        out[key] = read_box(storage, name, entry, [0] * len(entry["shape"]), entry["shape"])
    return out


__all__ = [
    "READERS",
    "Read",
    "box_reads",
    "chunked_keys",
    "fill",
    "read_box",
    "read_chunk",
    "read_whole",
    "run_reads",
    "without_chunked",
]
