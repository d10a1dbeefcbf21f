"""Reading a payload file whole: mapped or read directly, hashed in file order.

The reverse of :mod:`safepoint.storage.payload_write`: the whole file lands in one
buffer while the caller's thread hashes the chunks already there, in file order, so
the bytes hashed are the bytes returned and every tensor is a view into that buffer
(copied once, from the device). On a root with the :class:`LocalFiles` capability the
buffer is a private mapping of the file (or an aligned buffer filled with direct
reads where mapping fails); on any other root it is filled through
``Storage.open_read``. Which is fastest, and why, is in ``bench/README.md``.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from safepoint.ondisk.checksum import Hasher
from safepoint.storage.files import ALIGN, _disable_direct, _enable_direct, translate_read
from safepoint.storage.payload_write import aligned
from safepoint.storage.protocol import LocalFiles, Storage
from safepoint.storage.rangeimage import RANGE_THREADS, LazyImage, RangeReadable

_READ_CHUNK = 16 << 20


def _in_order(
    size: int, fill: Callable[[int, int], None], view: memoryview, *, threads: int
) -> str:
    """Run ``fill(begin, end)`` for each chunk on a few threads; hash chunks in order.

    Cold reads scale with the number of requests in flight, while the hash must see
    the bytes in file order: each chunk has an event set once it is filled, and the
    caller's thread hashes chunk after chunk as their events fire.
    """
    starts = list(range(0, size, _READ_CHUNK))
    done = [threading.Event() for _ in starts]
    errors: list[BaseException] = []
    lock = threading.Lock()
    cursor = iter(range(len(starts)))

    def work() -> None:
        while True:
            with lock:
                index = next(cursor, None)
            if index is None or errors:
                return
            try:
                begin = starts[index]
                fill(begin, min(begin + _READ_CHUNK, size))
            except BaseException as exc:
                errors.append(exc)
            finally:
                done[index].set()

    workers = [
        threading.Thread(target=work, name="safepoint-read", daemon=True)
        for _ in range(max(1, min(threads, len(starts))))
    ]
    for worker in workers:
        worker.start()
    hasher = Hasher()
    try:
        for index, begin in enumerate(starts):
            done[index].wait()
            if errors:
                break
            hasher.update(view[begin : min(begin + _READ_CHUNK, size)])
    finally:
        for worker in workers:
            worker.join()
    if errors:
        raise errors[0]
    return hasher.hexdigest()


#: ``madvise(MADV_POPULATE_READ)`` (Linux 5.14): fault a whole range in with one call.
_POPULATE_READ = 22


def _populate(mapping: mmap.mmap, begin: int, end: int) -> None:
    start = begin - begin % mmap.PAGESIZE
    try:
        mapping.madvise(_POPULATE_READ, start, end - start)
    except OSError:  # an older kernel: touch one byte per page instead
        pages = np.frombuffer(mapping, dtype=np.uint8, count=end - begin, offset=begin)
        int(pages[:: mmap.PAGESIZE].sum())


def map_image(
    fd: int, size: int, *, threads: int = 4, lazy: bool = False
) -> tuple[np.ndarray, str | None]:
    """Map the file ``fd`` privately, fault it in with a few threads, hash it in order.

    The page cache fills from several readahead streams at once, no anonymous memory
    is touched, and the returned array is a copy-on-write view of the file, writable
    without changing it. A file truncated by another process while mapped raises
    SIGBUS on access, as with any mapped file.

    ``lazy=True`` maps and returns at once, reading nothing and hashing nothing (the
    digest is None): pages are read from the file when first touched.
    """
    if size == 0:
        return np.empty(0, dtype=np.uint8), Hasher().hexdigest()
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if lazy:
        return np.frombuffer(mapping, dtype=np.uint8), None
    view = memoryview(mapping)
    try:
        digest = _in_order(
            size, lambda begin, end: _populate(mapping, begin, end), view, threads=threads
        )
    finally:
        view.release()
    return np.frombuffer(mapping, dtype=np.uint8), digest


def read_image(fd: int, size: int, *, threads: int = 4) -> tuple[np.ndarray, str]:
    """Read the whole file ``fd`` (``size`` bytes) into one aligned buffer; hash it.

    Returns the bytes as a ``uint8`` array (views of it keep the buffer alive) and
    the checksum of exactly those bytes. Uses ``O_DIRECT`` where the file system
    allows it; the page cache and a readahead hint otherwise.
    """
    capacity = -(-size // ALIGN) * ALIGN
    image = np.frombuffer(aligned(capacity), dtype=np.uint8)
    view = image.data
    direct = size >= ALIGN and _enable_direct(fd)
    if direct:
        try:  # probe: a file system may accept the flag and still refuse the read
            os.preadv(fd, [view[:ALIGN]], 0)
        except OSError:
            _disable_direct(fd)
            direct = False
    if not direct and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)

    def fill(begin: int, end: int) -> None:
        # Direct reads must cover whole blocks; the buffer has room up to the next one.
        stop = -(-end // ALIGN) * ALIGN if direct else end
        got = begin
        while got < end:
            n = os.preadv(fd, [view[got:stop]], got)
            if n <= 0:
                raise EOFError(f"file ended after {got} of {size} bytes")
            got += n

    return image[:size], _in_order(size, fill, view, threads=threads)


def read_stream(source: BinaryIO, size: int) -> tuple[np.ndarray, str]:
    """Read ``size`` bytes of ``source`` (any file object) into one buffer; hash them.

    The portable path, for roots without :class:`LocalFiles`, ``size`` already checked
    against the manifest: ranges read in parallel where ``source`` is
    :class:`RangeReadable` (an object store), else one sequential pass.
    """
    image = np.empty(size, dtype=np.uint8)
    view = image.data
    ranged = getattr(source, "raw", source)  # under an io.BufferedReader, if any
    if isinstance(ranged, RangeReadable):

        def fill(begin: int, end: int) -> None:
            ranged.read_range_into(view[begin:end], begin)

        return image, _in_order(size, fill, view, threads=RANGE_THREADS)
    hasher = Hasher()
    got = 0
    while got < size:
        chunk = source.read(min(_READ_CHUNK, size - got))
        n = len(chunk)
        view[got : got + n] = chunk
        if not n:
            raise EOFError(f"file ended after {got} of {size} bytes")
        hasher.update(view[got : got + n])
        got += n
    return image, hasher.hexdigest()


def read_payload(
    storage: Storage, relpath: str, size: int, *, lazy: bool = False
) -> tuple[Any, str | None]:
    """The whole payload file ``relpath`` of ``size`` bytes and its checksum.

    ``size`` must already be checked against the manifest (:meth:`Storage.size`), so
    the buffer allocated is no larger than the file really is. On a local root the
    file is mapped (``lazy``: without reading it; the digest is then None) or, where
    mapping fails, read with direct I/O; elsewhere it is streamed, or with ``lazy``
    on an object store becomes a :class:`LazyImage` fetched range by range when
    used (the digest is then None). ``EOFError`` means the file shrank while being
    read.
    """
    if lazy and not isinstance(storage, LocalFiles):
        source = storage.open_read(relpath)  # kept open by the image: read when used
        ranged = getattr(source, "raw", source)
        if isinstance(ranged, RangeReadable):
            return LazyImage.open(ranged, f"{storage.root}/{relpath}", size), None
        source.close()
    with storage.open_read(relpath) as f:
        if not isinstance(storage, LocalFiles):
            return read_stream(f, size)
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise EOFError(f"file is {actual} bytes, not the {size} checked")
        try:
            return map_image(f.fileno(), size, lazy=lazy)
        except (OSError, ValueError):  # a file system that cannot map files
            with translate_read(relpath):
                return read_image(f.fileno(), size)


__all__ = [
    "RANGE_THREADS",
    "RangeReadable",
    "map_image",
    "read_image",
    "read_payload",
    "read_stream",
]
