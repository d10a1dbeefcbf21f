"""A payload object read on demand: ``load(url, mmap=True)`` on an object store.

A local payload is mapped, and the pages a reader touches are the bytes it reads. An
object store has no mapping, so :class:`LazyImage` stands in for the mapped file: it
fetches the head of the object once (where a safetensors header lives), answers
slices of it from memory, and turns any other slice into a :class:`LazyImage` of
that range, fetched with ranged GETs (several in flight for a large one) only when
its bytes are asked for (:func:`fetched`). The format reader slices it exactly as it
slices a mapped file, so each tensor of the checkpoint becomes one range, read when
the state tree's entry holding it is first accessed (:mod:`safepoint.catalog.lazytree`).

As with a mapped local file, the bytes of a lazy read are not checksummed (only
headers, sizes and offsets are validated): verify the checkpoint, or load it without
``mmap``, when that matters.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

import numpy as np

from safepoint.errors import CheckpointNotFoundError

#: Ranged requests in flight while one payload object (or one large tensor) is read.
RANGE_THREADS = 8


@runtime_checkable
class RangeReadable(Protocol):
    """A file object that reads any range on request, from several threads at once (an
    object store's ranged GETs): readers keep ``RANGE_THREADS`` ranges in flight."""

    def read_range_into(self, view: memoryview, offset: int) -> None: ...


#: Fetched with the first request: a safetensors header (its 8-byte length, then JSON).
HEAD_BYTES = 64 << 10
#: A range larger than this is split into pieces fetched in parallel.
_PIECE = 16 << 20


class LazyImage:
    """Bytes ``[begin, end)`` of one object, fetched when first needed."""

    def __init__(
        self, source: RangeReadable, where: str, begin: int, end: int, head: bytes
    ) -> None:
        self._source, self._where = source, where
        self._begin, self._end, self._head = begin, end, head
        self._data: np.ndarray | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, source: RangeReadable, where: str, size: int) -> LazyImage:
        """The whole object of ``size`` bytes (already checked); fetches its head now."""
        head = np.empty(min(size, HEAD_BYTES), dtype=np.uint8)
        _fill(source, where, head, 0, later=False)  # a missing object is the caller's to name
        return cls(source, where, 0, size, head.tobytes())

    def __len__(self) -> int:
        return self._end - self._begin

    @property
    def nbytes(self) -> int:
        return len(self)

    def __getitem__(self, index: Any) -> LazyImage:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a lazy payload is sliced by contiguous ranges only")
        start, stop, _ = index.indices(len(self))
        stop = max(start, stop)
        return LazyImage(
            self._source, self._where, self._begin + start, self._begin + stop, self._head
        )

    def tobytes(self) -> bytes:
        return self.fetch().tobytes()

    def fetch(self) -> np.ndarray:
        """The bytes of this range (read once, then kept)."""
        with self._lock:
            if self._data is None:
                if self._end <= len(self._head):  # a copy: writable, like any other tensor
                    data = np.frombuffer(self._head, np.uint8)[self._begin : self._end].copy()
                else:
                    data = np.empty(len(self), dtype=np.uint8)
                    _fill(self._source, self._where, data, self._begin)
                self._data = data
            return self._data


def fetched(raw: Any) -> Any:
    """``raw`` as a numpy array: a :class:`LazyImage` is fetched, anything else returned."""
    return raw.fetch() if isinstance(raw, LazyImage) else raw


def _fill(
    source: RangeReadable, where: str, out: np.ndarray, offset: int, *, later: bool = True
) -> None:
    view = out.data.cast("B")
    pieces = [(b, min(b + _PIECE, len(out))) for b in range(0, len(out), _PIECE)]
    errors: list[BaseException] = []

    def read(begin: int, end: int) -> None:
        try:
            source.read_range_into(view[begin:end], offset + begin)
        except BaseException as exc:
            errors.append(exc)

    if len(pieces) <= 1:
        for begin, end in pieces:
            read(begin, end)
    else:
        cursor = iter(pieces)
        guard = threading.Lock()

        def work() -> None:
            while not errors:
                with guard:
                    piece = next(cursor, None)
                if piece is None:
                    return
                read(*piece)

        threads = [threading.Thread(target=work, daemon=True) for _ in range(RANGE_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        if later and isinstance(errors[0], FileNotFoundError):
            raise CheckpointNotFoundError(
                f"{where} is gone: the checkpoint was deleted or re-saved after it was "
                "loaded with mmap=True, whose tensors are read when first used. Expected "
                "it to stay while its tensors are read. Load it again (a newer checkpoint "
                "may exist), or load without mmap to read everything at once."
            ) from errors[0]
        raise errors[0]


__all__ = ["HEAD_BYTES", "RANGE_THREADS", "LazyImage", "RangeReadable", "fetched"]
