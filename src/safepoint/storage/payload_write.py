"""Large aligned writes of payload files: the streaming writer and its reused chunks.

On the machines this project runs on, touching fresh pages costs more than moving
the bytes (``bench/README.md``), and buffered writes touch one fresh page of page
cache per 4 KiB written. So payload bytes are copied into a few *reused*,
page-aligned chunks and written with ``O_DIRECT`` (one background thread does the
``write`` calls, which release the GIL, while the caller fills the next chunk). The
checksum is computed over each chunk after the copy, so it covers exactly the bytes
handed to the device. A buffer that is already page-aligned and starts at an aligned
file position (an async save's staged file image, see :mod:`.staging`) skips the
copy: its slices go to the device as they are. Where the file system refuses ``O_DIRECT``
the sources are written with ``writev`` from their own buffers instead, with no copy.
Reading whole payload files is :mod:`safepoint.storage.payload_read`.
"""

from __future__ import annotations

import mmap
import queue
import threading

import numpy as np

from safepoint.ondisk.checksum import Hasher
from safepoint.storage.files import ALIGN
from safepoint.storage.protocol import Writer

#: Largest chunk of the writer: smaller chunks keep the copy in cache, larger ones and
#: more writer threads measured slower (bench/write_modes.py; figures in bench/README.md).
MAX_CHUNK = 2 << 20
MIN_CHUNK = 1 << 20
#: Largest write of a buffer passed through without a copy. With no copy to keep in
#: cache, larger writes only mean fewer syscalls and less CPU (bench/README.md).
PASS_CHUNK = 32 << 20
#: Chunks per writer: one being filled, the rest queued or being written.
DEPTH = 3
_FLUSH_BYTES = 256 << 20
_FLUSH_COUNT = 1024


def chunk_size(total: int) -> int:
    """The chunk size for a file of ``total`` bytes: ~1/128 of it, within 1-2 MiB.

    Small files get small chunks so that the writer's memory (``DEPTH`` chunks) stays a
    few percent of the state it writes.
    """
    size = MIN_CHUNK
    while size < MAX_CHUNK and size * 2 * 128 <= total:
        size *= 2
    return size


def aligned(nbytes: int) -> mmap.mmap:
    """A page-aligned anonymous buffer.

    No transparent-huge-page hint: with THP defrag on madvise, touching huge-page
    memory measured slower than plain pages (bench/README.md).
    """
    return mmap.mmap(-1, max(nbytes, 1))


class _Pool:
    """Chunks kept between saves so that their pages are touched only once per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[np.ndarray]] = {}

    def take(self, size: int) -> np.ndarray:
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
            # A different size is wanted: drop the others, so the pool holds one size.
            self._free = {size: self._free.get(size, [])}
        arr = np.frombuffer(aligned(size), dtype=np.uint8)
        arr.fill(0)  # touch now, once, rather than on the first copy of every save
        return arr

    def give(self, chunk: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault(chunk.nbytes, [])
            if len(free) < DEPTH:
                free.append(chunk)


_POOL = _Pool()


class PayloadStream:
    """Writes a sequence of buffers to ``sink`` and hashes them on the way.

    Call :meth:`write` for each buffer, in file order, then :meth:`close`, which
    returns ``(size, hexdigest)`` once the file is durable; :meth:`abort` on failure.
    """

    def __init__(self, sink: Writer, *, size_hint: int) -> None:
        self._sink = sink
        self._hasher = Hasher()
        self._size = 0
        self._direct = bool(getattr(sink, "direct", False))
        # buffered mode: batches of source views for writev
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        # direct mode: the chunk being filled and the I/O thread
        self._chunk_size = chunk_size(size_hint)
        self._chunk: np.ndarray | None = None
        self._fill = 0
        # (buffer, bytes to write, whether it is a pooled chunk to hand back)
        self._queue: queue.Queue[tuple[np.ndarray, int, bool] | None] = queue.Queue()
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._owned: list[np.ndarray] = []

    # -- buffered ----------------------------------------------------------------------
    def _flush_pending(self) -> None:
        self._hasher.update_all(self._pending)
        self._sink.write(self._pending)
        self._pending, self._pending_bytes = [], 0

    # -- direct ------------------------------------------------------------------------
    def _start(self) -> None:
        for _ in range(DEPTH):
            chunk = _POOL.take(self._chunk_size)
            self._owned.append(chunk)
            self._free.put(chunk)
        self._thread = threading.Thread(target=self._io, name="safepoint-write", daemon=True)
        self._thread.start()

    def _io(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            chunk, n, pooled = item
            try:
                if self._error is None:
                    self._sink.write([chunk[:n].data])
            except BaseException as exc:  # handed to the caller on its next call
                self._error = exc
            finally:
                if pooled:
                    self._free.put(chunk)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _submit(self) -> None:
        assert self._chunk is not None
        view = self._chunk[: self._fill]
        self._hasher.update(view.data)  # the exact bytes handed to the device
        self._queue.put((self._chunk, self._fill, True))
        self._chunk, self._fill = None, 0

    def _pass_through(self, src: np.ndarray) -> int:
        """Queue the aligned leading part of ``src`` without copying; return its length.

        Only when the file position is at a chunk boundary (nothing half-filled) and
        ``src`` starts on a page: then every slice is aligned in address, size and file
        offset, as ``O_DIRECT`` needs. The caller guarantees that ``src`` does not change
        until :meth:`close` returns.
        """
        if self._fill or not src.nbytes or src.ctypes.data % ALIGN:
            return 0
        if self._thread is None:
            self._start()
        usable = src.nbytes - src.nbytes % ALIGN
        for begin in range(0, usable, PASS_CHUNK):
            piece = src[begin : min(begin + PASS_CHUNK, usable)]
            self._check()
            self._hasher.update(piece.data)
            self._queue.put((piece, piece.nbytes, False))
        return usable

    def _copy(self, src: np.ndarray) -> None:
        if not src.nbytes:
            return
        if self._thread is None:
            self._start()
        done = 0
        while done < src.nbytes:
            if self._chunk is None:
                self._chunk = self._free.get()
                self._check()
            n = min(src.nbytes - done, self._chunk_size - self._fill)
            np.copyto(self._chunk[self._fill : self._fill + n], src[done : done + n])
            self._fill += n
            done += n
            if self._fill == self._chunk_size:
                self._submit()

    # -- public ------------------------------------------------------------------------
    def write(self, buf: memoryview) -> None:
        """Append ``buf`` to the file (it is read now or before :meth:`close` returns)."""
        if not buf.nbytes:
            return
        self._size += buf.nbytes
        if self._direct:
            src = np.frombuffer(buf, dtype=np.uint8)
            self._copy(src[self._pass_through(src) :])
            return
        self._pending.append(buf)
        self._pending_bytes += buf.nbytes
        if len(self._pending) >= _FLUSH_COUNT or self._pending_bytes >= _FLUSH_BYTES:
            self._flush_pending()

    def _drain(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            for chunk in self._owned:
                _POOL.give(chunk)
            self._owned = []

    def close(self) -> tuple[int, str]:
        """Write what is left, make the file durable, return ``(size, digest)``."""
        try:
            if self._direct:
                if self._chunk is not None and self._fill:
                    self._submit()  # an unaligned tail: the sink finishes it buffered
                self._drain()
                self._check()
            else:
                self._flush_pending()
        except BaseException:
            self.abort()
            raise
        self._sink.close()
        return self._size, self._hasher.hexdigest()

    def abort(self) -> None:
        """Stop writing and close the file without making it durable."""
        if self._thread is not None:
            self._error = self._error or RuntimeError("aborted")
            self._drain()
        self._sink.abort()


__all__ = [
    "DEPTH",
    "MAX_CHUNK",
    "MIN_CHUNK",
    "PASS_CHUNK",
    "PayloadStream",
    "aligned",
    "chunk_size",
]
