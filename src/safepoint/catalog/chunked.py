"""Reading chunked tensors (multi-rank saves): whole tensors or one rank's box of them.

The manifest has validated every chunk's box and byte range (:mod:`safepoint.ondisk.chunks`)
before anything here runs, so allocations are bounded by the declared shapes, which the
payload files' sizes bound in turn. Each chunk read is checked against its own xxh3: a
rank restoring a box reads, and verifies, only the chunks that overlap it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from safepoint.errors import CorruptCheckpointError
from safepoint.ondisk import checksum, chunks
from safepoint.ondisk.manifest import Manifest
from safepoint.state import dtypes
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


def read_chunk(storage: Storage, name: str, chunk: dict[str, Any]) -> np.ndarray:
    """One chunk's verified bytes (writable: torch takes them without a copy)."""
    relpath = f"{name}/{chunk['file']}"
    begin, end = int(chunk["begin"]), int(chunk["end"])
    # Bounded by the file's size (validated manifest); not zero-filled: every byte is
    # read into it, or the read fails.
    data = np.empty(end - begin, dtype=np.uint8)
    got = 0
    with storage.open_read(relpath) as f:
        f.seek(begin)
        view = memoryview(data.data).cast("B")
        readinto = getattr(f, "readinto", None)  # a file; an object store's reader may lack it
        while got < len(data):
            if readinto is not None:
                n = readinto(view[got:])
            else:
                piece = f.read(len(data) - got)
                view[got : got + len(piece)] = piece
                n = len(piece)
            if not n:
                break
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
        actual=checksum.digest_bytes(data.data),  # type: ignore[arg-type]
    )
    return data


def read_box(
    storage: Storage,
    name: str,
    entry: dict[str, Any],
    offsets: Sequence[int],
    sizes: Sequence[int],
) -> np.ndarray:
    """The box ``offsets``/``sizes`` of a chunked tensor, as raw bytes (``uint8``, flat)."""
    dt = dtypes.BY_NAME[entry["dtype"]]
    item = np.dtype(f"V{dt.itemsize}")
    if math.prod(sizes) == 0:
        return np.zeros(0, dtype=np.uint8)
    for chunk in entry[chunks.KEY]:
        if chunk["offsets"] == list(offsets) and chunk["sizes"] == list(sizes):
            # the box is one saved chunk (a restore on the saving world size): no copy
            return read_chunk(storage, name, chunk)
    out = np.zeros(tuple(sizes), dtype=item)
    for chunk in entry[chunks.KEY]:
        co, cs = chunk["offsets"], chunk["sizes"]
        lo = [max(a, b) for a, b in zip(offsets, co, strict=True)]
        hi = [min(a + x, b + y) for a, x, b, y in zip(offsets, sizes, co, cs, strict=True)]
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            continue
        data = read_chunk(storage, name, chunk).view(item).reshape(tuple(cs))
        src = tuple(slice(low - b, h - b) for low, h, b in zip(lo, hi, co, strict=True))
        dst = tuple(slice(low - b, h - b) for low, h, b in zip(lo, hi, offsets, strict=True))
        out[dst] = data[src]
    return out.reshape(-1).view(np.uint8)


def read_whole(storage: Storage, name: str, found: Manifest) -> dict[str, np.ndarray]:
    """Every chunked tensor of ``found`` assembled whole (one process reading it all)."""
    out: dict[str, np.ndarray] = {}
    for key in chunked_keys(found):
        entry = found.tensors[key]
        out[key] = read_box(storage, name, entry, [0] * len(entry["shape"]), entry["shape"])
    return out


__all__ = ["chunked_keys", "read_box", "read_chunk", "read_whole", "without_chunked"]
