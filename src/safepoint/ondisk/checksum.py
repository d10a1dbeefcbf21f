"""File checksums: one fast non-cryptographic hash, computed while bytes stream by.

xxh3-64 runs at memory speed (tens of GB/s), so hashing as we write or read costs
little next to the disk. It detects accidental damage (bit rot, truncation, torn
writes), not tampering; the reader's structural checks handle hostile input.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import xxhash

from safepoint.errors import CorruptCheckpointError

ALGORITHM = "xxh3_64"
_CHUNK = 8 << 20


class Hasher:
    """Incremental xxh3-64 over a stream of buffers."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def update_all(self, buffers: Iterable[bytes | memoryview]) -> None:
        for buf in buffers:
            self._h.update(buf)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def digest_bytes(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def check(file: str, *, expected: str, actual: str) -> None:
    """Raise ``CorruptCheckpointError`` when two digests differ."""
    if expected != actual:
        raise CorruptCheckpointError(
            f"Checksum mismatch in {file}. Expected {ALGORITHM} {expected}. Received: "
            f"{actual}. The file was damaged after it was written; restore an older "
            "checkpoint (restore('latest') does so automatically).",
            file=file,
            expected=expected,
            actual=actual,
        )


def check_size(file: str, *, expected: int, actual: int) -> None:
    if expected != actual:
        raise CorruptCheckpointError(
            f"Size mismatch in {file}. Expected {expected} bytes. Received: {actual} bytes. "
            "The file was truncated or extended after it was written; restore an older "
            "checkpoint.",
            file=file,
            expected=expected,
            actual=actual,
        )


def hash_stream(f: Any, size: int, *, file: str) -> str:
    """Hash exactly ``size`` bytes of ``f`` with one reused buffer."""
    hasher = xxhash.xxh3_64()
    buf = bytearray(min(_CHUNK, max(size, 1)))
    view = memoryview(buf)
    remaining = size
    while remaining:
        n = f.readinto(view[: min(len(buf), remaining)])
        if not n:
            check_size(file, expected=size, actual=size - remaining)
        hasher.update(view[:n])
        remaining -= n
    if f.read(1):
        raise CorruptCheckpointError(f"{file} is longer than its manifest says.", file=file)
    return hasher.hexdigest()


__all__ = ["ALGORITHM", "Hasher", "check", "check_size", "digest_bytes", "hash_stream"]
