"""Where checkpoint bytes go: the storage interface and the local-directory backend.

File-level I/O lives in :mod:`safepoint.localfile`, name checks in :mod:`safepoint.names`.

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

``OSError`` becomes a safepoint error in one place: :func:`safepoint.localfile.translate`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import stat
import weakref
from collections.abc import Sequence
from typing import BinaryIO, Protocol

from . import held
from .errors import CorruptCheckpointError, StorageError

# translate_read, LOG_NAME, check_name...: re-exported for the formats, catalog, adapters.
from .localfile import LocalWriter, _exchange, _write_all, translate, translate_read
from .names import LOG_NAME, TMP_MARK, TRASH_PREFIX, check_name, component_problem  # noqa: F401
from .names import split as _split


class Writer(Protocol):
    """A payload file being written; ``close()`` makes it durable or raises."""

    def write(self, buffers: Sequence[memoryview]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    """The handful of operations a checkpoint root needs (local disk or object store)."""

    root: str

    def list_names(self) -> list[str]: ...
    def is_dir(self, name: str) -> bool: ...
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


class LocalStorage:
    """A checkpoint root on a local (or POSIX network) file system."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self._lock_fd: int | None = None
        self._held: held.Held | None = None

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
        """Open ``relpath`` below the root without following any link below it.

        Reads add ``O_NONBLOCK``: opening a FIFO planted where a file belongs would
        otherwise wait forever for a writer (callers check the opened descriptor's
        type). In a view from :func:`safepoint.held.hold`, the held checkpoint is the
        directory opened then, and files it opened ahead are taken from it.
        """
        parts = _split(relpath)
        if not flags & (os.O_WRONLY | os.O_RDWR):
            flags |= held.READ
        view = self._held
        if view is not None and len(parts) > 1 and parts[0] == view.name:
            fd = view.files.pop(relpath, None) if flags == held.READ else None
            if fd is not None:
                return fd
            dirfd, owned, rest = view.fd, False, parts[1:]
        else:
            dirfd, owned, rest = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY), True, parts
        try:
            for part in rest[:-1]:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
                if owned:
                    os.close(dirfd)
                dirfd, owned = nxt, True
            return os.open(rest[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)
        except OSError as exc:
            # ELOOP: a link (O_NOFOLLOW); ENOTDIR: a file or FIFO where a directory
            # belongs; ENXIO: a socket, which no open() can read.
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
                raise held.refusal(self.root, relpath) from exc
            raise
        finally:
            if owned:
                os.close(dirfd)

    def _open_file(self, relpath: str) -> int:
        """Open a regular file for reading; anything else (a FIFO, a device) is refused."""
        fd = self._open(relpath, os.O_RDONLY)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise held.not_a_file(self.describe(relpath), relpath, mode)
            # Regular files ignore O_NONBLOCK, but a descriptor handed to other code
            # should behave as an ordinary one.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def exists(self, relpath: str) -> bool:
        try:
            with translate_read(self.describe(relpath)):
                os.close(self._open(relpath, os.O_RDONLY))
            return True
        except FileNotFoundError:
            return False

    def size(self, relpath: str) -> int:
        with translate_read(self.describe(relpath)):
            fd = self._open_file(relpath)
            try:
                return os.fstat(fd).st_size
            finally:
                os.close(fd)

    def read_bytes(self, relpath: str, *, max_size: int) -> bytes:
        with translate_read(self.describe(relpath)):
            return self._read_bytes(relpath, max_size=max_size)

    def _read_bytes(self, relpath: str, *, max_size: int) -> bytes:
        fd = self._open_file(relpath)
        try:
            info = os.fstat(fd)
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
            fd = self._open_file(relpath)
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
