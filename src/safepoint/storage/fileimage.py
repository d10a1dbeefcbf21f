"""A payload file's whole image in memory: mapped or read directly, hashed in order.

Reading is the reverse of ``directio.py``'s writing: the whole file lands in one
buffer (a private mapping of the file, or an aligned buffer filled with direct reads
of a few MiB each) while the caller's thread hashes the chunks already there, in file
order. Every tensor is then a view into that buffer, so the bytes are copied once,
from the device. Measured in ``bench/README.md`` (``write_modes.py``, cold reads).
"""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np

from safepoint.ondisk.checksum import Hasher
from safepoint.storage.directio import aligned
from safepoint.storage.files import ALIGN

_READ_CHUNK = 16 << 20


class _Reads:
    """Chunks of one file read by a few threads in parallel, hashed in file order.

    Cold reads on these machines scale with the number of requests in flight (one
    16 MiB direct read at a time reached ~0.9 GB/s, four ~1.4 GB/s), while the hash
    must see the bytes in order: each chunk has an event set when it has been read.
    """

    def __init__(self, fd: int, view: memoryview, size: int, direct: bool) -> None:
        self.fd, self.view, self.size, self.direct = fd, view, size, direct
        self.starts = list(range(0, size, _READ_CHUNK))
        self.done = [threading.Event() for _ in self.starts]
        self.errors: list[BaseException] = []
        self._next = 0
        self._lock = threading.Lock()

    def _read(self, index: int) -> None:
        begin = self.starts[index]
        end = min(begin + _READ_CHUNK, self.size)
        # Direct reads must cover whole blocks; the buffer has room up to the next one.
        stop = -(-end // ALIGN) * ALIGN if self.direct else end
        got = begin
        while got < end:
            n = os.preadv(self.fd, [self.view[got:stop]], got)
            if n <= 0:
                raise EOFError(f"file ended after {got} of {self.size} bytes")
            got += n

    def work(self) -> None:
        while True:
            with self._lock:
                index, self._next = self._next, self._next + 1
            if index >= len(self.starts) or self.errors:
                return
            try:
                self._read(index)
            except BaseException as exc:
                self.errors.append(exc)
            finally:
                self.done[index].set()


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

    The fastest way measured here to get a whole file into memory with its checksum
    (``bench/README.md``): the page cache fills from several readahead streams at
    once, no anonymous memory is touched, and the returned array is a copy-on-write
    view of the file, writable without changing it. The bytes hashed are the bytes
    returned. A file truncated by another process while mapped raises SIGBUS on
    access, as with any mapped file.

    ``lazy=True`` maps and returns at once, reading nothing and hashing nothing (the
    digest is None): pages are read from the file when first touched.
    """
    if size == 0:
        return np.empty(0, dtype=np.uint8), Hasher().hexdigest()
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if lazy:
        return np.frombuffer(mapping, dtype=np.uint8), None
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
                _populate(mapping, begin, min(begin + _READ_CHUNK, size))
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
    view = memoryview(mapping)
    try:
        for index, begin in enumerate(starts):
            done[index].wait()
            if errors:
                break
            hasher.update(view[begin : min(begin + _READ_CHUNK, size)])
    finally:
        for worker in workers:
            worker.join()
        view.release()
    if errors:
        raise errors[0]
    return np.frombuffer(mapping, dtype=np.uint8), hasher.hexdigest()


def read_image(fd: int, size: int, *, threads: int = 4) -> tuple[np.ndarray, str]:
    """Read the whole file ``fd`` (``size`` bytes) into one aligned buffer; hash it.

    Returns the bytes as a ``uint8`` array (views of it keep the buffer alive) and
    the checksum of exactly those bytes. Uses ``O_DIRECT`` where the file system
    allows it; the page cache and a readahead hint otherwise.
    """
    from safepoint.storage.files import _disable_direct, _enable_direct

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
    reads = _Reads(fd, view, size, direct)
    workers = [
        threading.Thread(target=reads.work, name="safepoint-read", daemon=True)
        for _ in range(max(1, min(threads, len(reads.starts))))
    ]
    for worker in workers:
        worker.start()
    hasher = Hasher()
    try:
        for index, begin in enumerate(reads.starts):
            reads.done[index].wait()
            if reads.errors:
                break
            hasher.update(view[begin : min(begin + _READ_CHUNK, size)])
    finally:
        for worker in workers:
            worker.join()
    if reads.errors:
        raise reads.errors[0]
    return image[:size], hasher.hexdigest()
