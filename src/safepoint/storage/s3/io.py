"""Payload bytes to and from S3: an upload that looks like a ``Writer``, a ranged reader.

:class:`S3Writer` streams a payload file as one object (obstore's buffered writer: one
PUT when small, a multipart upload with ``UPLOAD_CONCURRENCY`` parts in flight above
``PART_SIZE``). :class:`RangeFile` reads an object with ranged GETs, so a reader that
seeks reads only what it touches, and a whole-payload read has several ranges in
flight at once (:meth:`RangeFile.read_range_into`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from typing import Any

from safepoint.storage.s3.client import PART_SIZE, UPLOAD_CONCURRENCY, S3Client


class S3Writer:
    """A payload object being uploaded (multipart above ``PART_SIZE``)."""

    def __init__(
        self, client: S3Client, relpath: str, key: str, *, fault: Callable[[str, str], None]
    ) -> None:
        self._client = client
        self._fault = fault
        self._relpath = relpath
        self._key = key
        self._file = client.call(
            "open",
            key,
            client.obstore.open_writer,
            client.store,
            client.location.key(key),
            buffer_size=PART_SIZE,
            max_concurrency=UPLOAD_CONCURRENCY,
        )

    def write(self, buffers: Sequence[memoryview]) -> None:
        self._fault("write", self._relpath)
        for buf in buffers:
            if buf.nbytes:
                self._client.call("write", self._key, self._file.write, buf)

    def close(self) -> None:
        self._fault("fsync", self._relpath)
        self._client.call("write", self._key, self._file.close)

    def abort(self) -> None:
        # Leaving the context with an exception aborts the multipart upload; what a
        # crash leaves is unreferenced payload, removed by cleanup_stale.
        with contextlib.suppress(Exception):  # a failed abort leaves garbage, not damage
            self._file.__exit__(RuntimeError, RuntimeError("aborted"), None)


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of one object, read with ranged GETs."""

    def __init__(self, client: S3Client, key: str, size: int) -> None:
        self._client, self._key, self._size, self._pos = client, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readall(self) -> bytes:
        data = self._client.get_range(self._key, self._pos, self._size)  # one request
        self._pos += len(data)
        return data

    def read_range_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from ``offset`` with one ranged GET (thread-safe: it shares no
        position), so a restore reads one object with several requests in flight."""
        if offset < 0 or offset + view.nbytes > self._size:
            raise EOFError(f"range {offset}+{view.nbytes} is outside the {self._size} bytes")
        self._client.get_range_into(self._key, offset, view)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._size, self._pos + view.nbytes)
        data = self._client.get_range(self._key, self._pos, end)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


__all__ = ["RangeFile", "S3Writer"]
