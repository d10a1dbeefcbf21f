"""Local file I/O for the storage backend: OSError translation, writes, renames.

The one place where ``OSError`` becomes a safepoint error (:func:`translate`), the
payload writer (large ``writev`` calls; ``O_DIRECT`` from aligned buffers where the
file system allows it) and the atomic swap of two directory entries.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Iterator, Sequence
from typing import Any

from safepoint.errors import StorageError

_IOV_MAX = 1024


@contextlib.contextmanager
def translate(stage: str, target: str) -> Iterator[None]:
    """Turn an ``OSError`` raised by ``stage`` on ``target`` into a ``StorageError``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        hint = {
            errno.ENOSPC: "Free space on the device or point the manager at a larger root",
            errno.EDQUOT: "Free quota or point the manager at another root",
            errno.EROFS: "The root is read-only: choose a writable root for saving",
            errno.EACCES: "Check the root's permissions",
            errno.EPERM: "Check the root's permissions",
            errno.EIO: "The device reported an I/O error; check it before trusting it again",
        }.get(exc.errno or 0, "Check that the root exists and is writable")
        outcome = (
            "the new checkpoint was committed and nothing was deleted by mistake; retention "
            "runs again after the next save"
            if stage == "retention"
            else "checkpoints committed before this one are intact"
        )
        raise StorageError(
            f"Checkpoint storage failed at stage {stage!r} on {target}: "
            f"[Errno {exc.errno}] {exc.strerror or exc}. {hint}; {outcome}.",
            errno=exc.errno,
            stage=stage,
        ) from exc


@contextlib.contextmanager
def translate_read(target: str) -> Iterator[None]:
    """:func:`translate` for reads, except that a missing file stays ``FileNotFoundError``.

    Callers treat absence as an answer (no manifest: never committed). Any other
    ``OSError`` (EIO, EACCES...) is a storage fault, not an absence: it becomes a
    ``StorageError`` so a save fails rather than mistake an unreadable checkpoint for
    a missing one.
    """
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        with translate("read", target):
            raise exc


def _write_all(fd: int, buffers: Sequence[memoryview]) -> int:
    """Write every buffer with as few syscalls as possible; returns bytes written.

    ``writev`` takes up to IOV_MAX buffers per call and may write less than asked
    (Linux caps one call near 2 GiB), so the loop resumes mid-buffer.
    """
    pending = [b for b in buffers if b.nbytes]
    total = 0
    while pending:
        n = os.writev(fd, pending[:_IOV_MAX])
        if n <= 0:
            raise OSError(errno.EIO, "write returned no progress")
        total += n
        while n and pending:
            head = pending[0]
            if n >= head.nbytes:
                n -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[n:]
                n = 0
    return total


#: Alignment O_DIRECT needs for addresses, sizes and file offsets (the largest logical
#: block size in common use; 512-byte devices accept it too).
ALIGN = 4096


def _address(buf: memoryview) -> int:
    import numpy as np

    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) if buf.nbytes else 0


def _enable_direct(fd: int) -> bool:
    """Switch ``fd`` to ``O_DIRECT``; False where the file system refuses it.

    Direct writes skip the page cache, whose freshly touched pages are what costs most
    on these machines (bench/README.md); file systems without direct I/O (some network
    or FUSE mounts) refuse the flag with EINVAL and keep working buffered.
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | flag)
    except OSError:
        return False
    return True


def _disable_direct(fd: int) -> None:
    flag = getattr(os, "O_DIRECT", 0)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~flag)


class LocalWriter:
    """A payload file on a local disk: written sequentially, fsynced on close.

    ``direct`` is True while the descriptor is in ``O_DIRECT`` mode. Buffers that are
    4 KiB-aligned in address and size go straight to the device; the first buffer that
    is not (a file's unaligned tail, or a caller that does not chunk) switches the file
    to buffered writes for the rest, so any sequence of buffers is written correctly.
    The ``fsync`` on close covers both kinds of write.
    """

    def __init__(self, storage: Any, relpath: str, fd: int, *, direct: bool = True) -> None:
        self._storage = storage
        self._relpath = relpath
        self._fd: int | None = fd
        self.direct = direct and _enable_direct(fd)

    def write(self, buffers: Sequence[memoryview]) -> None:
        assert self._fd is not None, "write after close"
        with translate("write", self._storage.describe(self._relpath)):
            self._storage._fault("write", self._relpath)
            if self.direct:
                buffers = self._write_direct(self._fd, buffers)
            if buffers:
                _write_all(self._fd, buffers)

    def _write_direct(self, fd: int, buffers: Sequence[memoryview]) -> Sequence[memoryview]:
        """Write the aligned leading buffers directly; return what must go buffered."""
        for i, buf in enumerate(buffers):
            if buf.nbytes % ALIGN or _address(buf) % ALIGN:
                _disable_direct(fd)
                self.direct = False
                return buffers[i:]
            done = 0
            while done < buf.nbytes:
                try:
                    n = os.write(fd, buf[done:])
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    n = 0  # this device wants a larger alignment: finish buffered
                if n <= 0 or n % ALIGN:
                    _disable_direct(fd)
                    self.direct = False
                    return [buf[done + max(n, 0) :], *buffers[i + 1 :]]
                done += n
        return []

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with translate("fsync", self._storage.describe(self._relpath)):
                self._storage._fault("fsync", self._relpath)
                os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(root: str, a: str, b: str) -> bool:
    """Atomically swap two directory entries (Linux ``renameat2``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    src = os.fsencode(os.path.join(root, a))
    dst = os.fsencode(os.path.join(root, b))
    if fn(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err))


# ------------------------------------------------------------------------ the run log
def _open_log(path: str, flags: int) -> int:
    """Open the run log without following a link and without blocking on a FIFO."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "the run log is a symbolic link, not followed") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "the run log is not a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append_line(path: str, data: bytes) -> None:
    """Append ``data`` (whole lines) to the log at ``path`` in one ``O_APPEND`` write."""
    fd = _open_log(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        # A crash may have torn the last line; start on a fresh line so the torn
        # fragment does not swallow this record too.
        end = os.fstat(fd).st_size
        if end and os.pread(fd, 1, end - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)  # one write with O_APPEND: lines never interleave
    finally:
        os.close(fd)


def read_tail(path: str, limit: int) -> bytes:
    """The log at ``path``, or its last ``limit`` bytes from the first whole line."""
    fd = _open_log(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        start = max(size - limit, 0)
        chunks, offset = [], start
        while offset < size:
            chunk = os.pread(fd, min(size - offset, 1 << 24), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if start:
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    return data


__all__ = ["ALIGN", "LocalWriter", "append_line", "read_tail", "translate", "translate_read"]
