"""Where checkpoint bytes go: the storage interface and the local-directory backend.

Every byte safepoint reads or writes passes through a :class:`Storage`, so tests can
inject faults at each stage of a save and object stores can plug in later. The local
backend implements the commit protocol of the design (principle 1):

1. stage: ``mkdir ROOT/<name>.tmp-<random>`` inside the root (never ``$TMPDIR``: a
   rename across file systems is not atomic);
2. write each payload file, ``fsync`` it, close it; write ``manifest.json`` last and
   ``fsync`` it (the manifest is the commit record);
3. ``fsync`` the staging directory so its entries are durable;
4. commit: ``rename`` the staging directory to its final name (or atomically swap
   it with a committed one of the same name), then ``fsync`` the root so the rename
   itself survives a power loss.

An error at any stage fails the save and is never retried into a commit: after a
failed ``fsync`` the kernel may have dropped the dirty pages, so the bytes are gone.

Readers never follow a symbolic link below the root (``O_NOFOLLOW`` on every path
component) and never accept a path with ``..``, ``/`` or NUL in a component.

This module is the one place where ``OSError`` becomes a safepoint error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import stat
import weakref
from collections.abc import Iterator, Sequence
from typing import BinaryIO, Protocol

from .errors import CorruptCheckpointError, StorageError

LOG_NAME = "safepoint-log.jsonl"
TMP_MARK = ".tmp-"
TRASH_PREFIX = ".trash-"
_IOV_MAX = 1024


def check_name(name: str, *, what: str = "name") -> str:
    """Return ``name`` if it is a safe single path component; ``ConfigError`` otherwise."""
    from .errors import ConfigError

    problem = component_problem(name)
    if problem:
        raise ConfigError(
            f"Invalid checkpoint {what}: {problem}. Expected a single file name of at most 255 "
            f"bytes without '/', '\\', NUL or '..', not starting with '.'. Received: "
            f"{what}={name!r}. Choose a template whose fields format to plain text."
        )
    return name


def component_problem(name: object) -> str | None:
    """Why ``name`` is not a safe path component, or None when it is."""
    if not isinstance(name, str) or not name:
        return "empty or not a string"
    if "\x00" in name or "/" in name or "\\" in name:
        return "it contains a path separator or NUL"
    if name in (".", "..") or name.startswith("."):
        return "it is a relative path marker or hidden"
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return "it is longer than 255 bytes"
    if TMP_MARK in name or name == LOG_NAME:
        return "it collides with safepoint's own staging or log names"
    return None


def _split(relpath: str) -> list[str]:
    parts = relpath.split("/")
    for part in parts:
        problem = component_problem(part)
        if problem and not (
            TMP_MARK in part and component_problem(part.replace(TMP_MARK, "-")) is None
        ):
            raise CorruptCheckpointError(
                f"Refusing a path that leaves the checkpoint root: {problem}. Expected a "
                f"relative path inside the root. Received: path={relpath!r}. The manifest was "
                "tampered with; do not load this checkpoint.",
                file=relpath,
            )
    return parts


class Writer(Protocol):
    """A payload file being written; ``close()`` makes it durable or raises."""

    def write(self, buffers: Sequence[memoryview]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    """The handful of operations a checkpoint root needs (local disk or object store)."""

    root: str

    def list_names(self) -> list[str]: ...
    def read_bytes(self, relpath: str, *, max_size: int) -> bytes: ...
    def open_read(self, relpath: str) -> BinaryIO: ...
    def size(self, relpath: str) -> int: ...
    def exists(self, relpath: str) -> bool: ...
    def local_path(self, relpath: str) -> str | None: ...
    def stage(self, name: str) -> str: ...
    def open_write(self, relpath: str) -> Writer: ...
    def write_file(self, relpath: str, data: bytes, *, stage: str = "write") -> None: ...
    def commit(self, staged: str, name: str) -> None: ...
    def discard(self, staged: str) -> None: ...
    def remove(self, name: str) -> None: ...
    def cleanup_stale(self) -> list[str]: ...
    def append_log(self, line: str) -> None: ...
    def read_log(self) -> bytes: ...
    def lock(self) -> None: ...
    def unlock(self) -> None: ...


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
    on these machines (see PERF-NOTES); file systems without direct I/O (some network
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

    def __init__(
        self, storage: LocalStorage, relpath: str, fd: int, *, direct: bool = True
    ) -> None:
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


class LocalStorage:
    """A checkpoint root on a local (or POSIX network) file system."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self._lock_fd: int | None = None

    # -- hooks -------------------------------------------------------------------------
    def _fault(self, stage: str, target: str) -> None:
        """Fault-injection seam: tests override it to fail a given stage."""

    def describe(self, relpath: str = "") -> str:
        return os.path.join(self.root, relpath) if relpath else self.root

    # -- reading -----------------------------------------------------------------------
    def list_names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except NotADirectoryError as exc:
            raise StorageError(
                f"Checkpoint root {self.root!r} is a file. Expected a directory (or a path that "
                "does not exist yet). Choose another root.",
                errno=exc.errno,
                stage="list",
            ) from exc
        except OSError as exc:
            with translate("list", self.root):
                raise exc

    def is_dir(self, name: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(os.path.join(self.root, name)).st_mode)
        except OSError:
            return False

    def _open(self, relpath: str, flags: int, mode: int = 0o644) -> int:
        """Open ``relpath`` below the root without following any link below it."""
        parts = _split(relpath)
        dirfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
                os.close(dirfd)
                dirfd = nxt
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptCheckpointError(
                    f"Refusing to follow a symbolic link inside the checkpoint root: "
                    f"{self.describe(relpath)}. Expected regular files and directories. "
                    "Received: a link. Replace the link with the file it points to.",
                    file=relpath,
                ) from exc
            raise
        finally:
            os.close(dirfd)

    def exists(self, relpath: str) -> bool:
        try:
            with translate_read(self.describe(relpath)):
                os.close(self._open(relpath, os.O_RDONLY))
            return True
        except FileNotFoundError:
            return False

    def size(self, relpath: str) -> int:
        with translate_read(self.describe(relpath)):
            fd = self._open(relpath, os.O_RDONLY)
            try:
                return os.fstat(fd).st_size
            finally:
                os.close(fd)

    def read_bytes(self, relpath: str, *, max_size: int) -> bytes:
        with translate_read(self.describe(relpath)):
            return self._read_bytes(relpath, max_size=max_size)

    def _read_bytes(self, relpath: str, *, max_size: int) -> bytes:
        fd = self._open(relpath, os.O_RDONLY)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CorruptCheckpointError(
                    f"{self.describe(relpath)} is not a regular file.", file=relpath
                )
            if info.st_size > max_size:
                raise CorruptCheckpointError(
                    f"{self.describe(relpath)} is {info.st_size} bytes. Expected at most "
                    f"{max_size}. Received: a file too large to be a safepoint record; it "
                    "was not written by safepoint.",
                    file=relpath,
                    expected=max_size,
                    actual=info.st_size,
                )
            chunks = []
            remaining = info.st_size + 1  # one more byte: notice a file that grew
            while remaining > 0:
                chunk = os.read(fd, remaining)
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            data = b"".join(chunks)
            if len(data) > max_size:
                raise CorruptCheckpointError(
                    f"{self.describe(relpath)} grew while read.", file=relpath
                )
            return data
        finally:
            os.close(fd)

    def open_read(self, relpath: str) -> BinaryIO:
        with translate_read(self.describe(relpath)):
            fd = self._open(relpath, os.O_RDONLY)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptCheckpointError(
                f"{self.describe(relpath)} is not a regular file.", file=relpath
            )
        return os.fdopen(fd, "rb", buffering=0)

    def local_path(self, relpath: str) -> str | None:
        _split(relpath)
        return os.path.join(self.root, relpath)

    def read_log(self) -> bytes:
        try:
            with open(os.path.join(self.root, LOG_NAME), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    # -- writing -----------------------------------------------------------------------
    def _ensure_root(self) -> None:
        with translate("mkdir", self.root):
            os.makedirs(self.root, exist_ok=True)

    def stage(self, name: str) -> str:
        self._ensure_root()
        staged = f"{name}{TMP_MARK}{secrets.token_hex(4)}"
        with translate("stage", self.describe(staged)):
            self._fault("stage", staged)
            os.mkdir(os.path.join(self.root, staged), 0o755)
        return staged

    def open_write(self, relpath: str) -> Writer:
        with translate("open", self.describe(relpath)):
            self._fault("open", relpath)
            fd = self._open(relpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        return LocalWriter(self, relpath, fd)

    def write_file(self, relpath: str, data: bytes, *, stage: str = "write") -> None:
        with translate(stage, self.describe(relpath)):
            self._fault(stage, relpath)
            fd = self._open(relpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                _write_all(fd, [memoryview(data)])
                self._fault("fsync", relpath)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _fsync_dir(self, relpath: str, stage: str) -> None:
        path = self.describe(relpath)
        with translate(stage, path):
            self._fault(stage, relpath)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def commit(self, staged: str, name: str) -> None:
        # The staging directory's own entries must be durable before it becomes visible
        # under its final name; then the root's entry for the rename.
        self._fsync_dir(staged, "dir-fsync")
        replaced: str | None = None  # where the checkpoint this one replaces went
        with translate("rename", self.describe(name)):
            self._fault("rename", name)
            src, dst = os.path.join(self.root, staged), os.path.join(self.root, name)
            if os.path.lexists(dst):
                # Same name committed before (a resumed run saving the same step again):
                # swap atomically, so a crash leaves one complete checkpoint under that name.
                if _exchange(self.root, staged, name):
                    replaced = staged
                else:
                    replaced = f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}"
                    os.rename(dst, os.path.join(self.root, replaced))
                    try:
                        os.rename(src, dst)
                    except OSError:
                        os.rename(os.path.join(self.root, replaced), dst)  # put the old one back
                        raise
            else:
                os.rename(src, dst)
        try:
            self._fsync_dir("", "dir-fsync")
        except StorageError:
            # The rename may not be durable: undo it rather than let a save that raised
            # leave a checkpoint that could vanish on power loss. A replaced checkpoint goes
            # back under its name (the new one out of the listing, discarded by the caller).
            with contextlib.suppress(OSError):
                if replaced == staged:
                    _exchange(self.root, staged, name)
                else:
                    trash = f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}"
                    os.rename(dst, os.path.join(self.root, trash))
                    if replaced is not None:
                        os.rename(os.path.join(self.root, replaced), dst)
                    self.discard(trash)
            raise
        if replaced is not None:  # the old checkpoint, now out of the listing
            self.discard(replaced)

    def discard(self, staged: str) -> None:
        shutil.rmtree(os.path.join(self.root, staged), ignore_errors=True)

    def remove(self, name: str) -> None:
        """Delete a committed checkpoint: rename it out of the listing first, then remove.

        A crash between the two steps leaves a hidden trash directory that the next
        writer cleans up, never a half-deleted checkpoint that is still listed.
        """
        check_name(name)
        trash = f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}"
        with translate("retention", self.describe(name)):
            self._fault("retention", name)
            os.rename(os.path.join(self.root, name), os.path.join(self.root, trash))
        self._fsync_dir("", "retention")
        path = os.path.join(self.root, trash)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)  # a single-file checkpoint (safepoint.singlefile)

    def cleanup_stale(self) -> list[str]:
        """Remove staging and trash entries left by a crashed writer (lock holders only).

        Directories of checkpoints, and the files of single-file checkpoints
        (:mod:`safepoint.singlefile`): only names safepoint itself creates are touched.
        """
        from .singlefile import is_staged

        removed = []
        for entry in self.list_names():
            if TMP_MARK in entry or entry.startswith(TRASH_PREFIX):
                path = os.path.join(self.root, entry)
                if stat.S_ISREG(os.lstat(path).st_mode) and (
                    entry.startswith(TRASH_PREFIX) or is_staged(entry)
                ):
                    # a single-file checkpoint whose deletion (or commit) was cut short,
                    # or one staged by a killed writer
                    os.unlink(path)
                    removed.append(entry)
                    continue
                if os.path.islink(path) or not os.path.isdir(path):
                    continue
                shutil.rmtree(path, ignore_errors=True)
                removed.append(entry)
        return removed

    def append_log(self, line: str) -> None:
        data = (line.rstrip("\n") + "\n").encode()
        with translate("log", self.describe(LOG_NAME)):
            fd = os.open(
                os.path.join(self.root, LOG_NAME),
                os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                0o644,
            )
            try:
                # A crash may have torn the last line; start on a fresh line so the
                # torn fragment does not swallow this record too.
                end = os.fstat(fd).st_size
                if end and os.pread(fd, 1, end - 1) != b"\n":
                    data = b"\n" + data
                os.write(fd, data)  # one write with O_APPEND: lines never interleave
            finally:
                os.close(fd)

    # -- the writer lock ---------------------------------------------------------------
    def lock(self) -> None:
        """Take the root's writer lock (``flock`` on the root directory itself).

        Holding it on the directory needs no lock file, and the kernel drops it when the
        process dies, so a crash never leaves a stale lock behind.
        """
        if self._lock_fd is not None:
            return
        self._ensure_root()
        with translate("lock", self.root):
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise StorageError(
                f"Another writer holds the lock on checkpoint root {self.root!r}. Expected "
                "one writing CheckpointManager per root. Received: a second writer. Stop "
                "the other run, close its manager, or save to another root.",
                errno=exc.errno,
                stage="lock",
            ) from exc
        except OSError:
            os.close(fd)
            with translate("lock", self.root):
                raise
        self._lock_fd = fd
        # A manager dropped without close() (a notebook cell, a one-off script) must not
        # hold the root for the rest of the process: release the lock when it is collected.
        self._release = weakref.finalize(self, os.close, fd)

    def unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            self._release.detach()
            os.close(fd)  # closing the descriptor releases the flock
