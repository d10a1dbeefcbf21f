"""Where checkpoint bytes go: the storage interface and the local-directory backend.

File-level I/O lives in :mod:`safepoint.storage.files`, name checks in
:mod:`safepoint.ondisk.names`.

Every byte safepoint reads or writes passes through a :class:`Storage`, so tests can
inject faults at each stage of a save and object stores can plug in later. The local
backend's ``stage``/``commit``/``discard`` are the commit transaction of
:mod:`safepoint.storage.commit` (its docstring gives the call order and what each
failure leaves on disk), the same one single framework files go through.

Readers never follow a symbolic link below the root (``O_NOFOLLOW`` on every path
component) and never accept a path with ``..``, ``/`` or NUL in a component.

``OSError`` becomes a safepoint error in one place: :func:`safepoint.storage.files.translate`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import threading
import weakref
from collections.abc import Callable
from typing import BinaryIO

from safepoint.errors import CorruptCheckpointError, StorageError
from safepoint.ondisk.names import LOG_NAME, TMP_MARK, TRASH_PREFIX, check_name, component_problem  # noqa: F401
from safepoint.ondisk.names import split as _split
from safepoint.storage import commit as transaction
from safepoint.storage import held as heldview
from safepoint.storage import leftovers, rootlock
from safepoint.storage.blobs import LocalBlobStore

# translate_read, LOG_NAME, check_name...: re-exported for the formats, catalog, adapters.
from safepoint.storage.files import (
    LocalWriter,
    _write_all,
    append_line,
    read_tail,
    translate,
    translate_read,
)
from safepoint.storage.protocol import Storage, Writer  # noqa: F401  (re-exported)

#: ``read_log`` returns at most this many bytes (the newest lines): the log of a
#: million-step run stays readable without loading all of it.
LOG_READ_MAX = 64 << 20


#: The stages at which a :class:`LocalStorage` calls its ``faults`` hook, in the order a
#: save meets them: ``stage`` (mkdir of the staging entry), ``open`` / ``write`` /
#: ``fsync`` (each payload file), ``manifest`` (then its ``fsync``), ``dir-fsync`` (the
#: staging directory, then the root after the rename), ``rename`` (the commit), and
#: ``retention`` (each deletion, then the root fsync that makes the deletions durable).
#: A single framework file (``.h5``, ``.keras``) meets ``write``, ``manifest``,
#: ``fsync``, ``rename`` and ``dir-fsync``.
FAULT_STAGES: tuple[str, ...] = (
    "stage",
    "open",
    "write",
    "fsync",
    "manifest",
    "dir-fsync",
    "rename",
    "retention",
)

#: ``faults(stage, target)``: called right before the backend acts at ``stage`` on
#: ``target`` (a checkpoint name or a path relative to the root).
FaultHook = Callable[[str, str], None]


class LocalStorage:
    """A checkpoint root on a local (or POSIX network) file system.

    ``faults`` is the fault-injection seam for tests (production code passes none):
    it is called as ``faults(stage, target)`` right before each I/O step of a save
    (:data:`FAULT_STAGES`), and whatever it raises fails that step as a real error
    would: an ``OSError`` becomes a :class:`~safepoint.errors.StorageError` naming the
    stage, and the save undoes what it staged. A hook can also record the sequence of
    stages, or stall or kill the process at one of them.
    """

    def __init__(self, root: str | os.PathLike[str], *, faults: FaultHook | None = None) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self._faults = faults
        self._held: rootlock.Root | None = None
        self._mutex = threading.RLock()  # until the lock is taken (see serial())
        self._pinned: heldview.Held | None = None  # a reader's view: the checkpoint it opened

    # -- hooks -------------------------------------------------------------------------
    def _fault(self, stage: str, target: str) -> None:
        """Call the ``faults`` hook, if any: every write path of the backend (and of the
        single-file commit) calls this first, so tests can fail any stage of a save."""
        if self._faults is not None:
            self._faults(stage, target)

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
        type). In a view from :func:`safepoint.storage.held.hold`, the held checkpoint is the
        directory opened then, and files it opened ahead are taken from it.
        """
        parts = _split(relpath)
        if not flags & (os.O_WRONLY | os.O_RDWR):
            flags |= heldview.READ
        view = self._pinned
        if view is not None and len(parts) > 1 and parts[0] == view.name:
            fd = view.files.pop(relpath, None) if flags == heldview.READ else None
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
                raise heldview.refusal(self.root, relpath) from exc
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
                raise heldview.not_a_file(self.describe(relpath), relpath, mode)
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

    def blob_store(self) -> LocalBlobStore:
        """The root's dedup blobs, shared by hard links (:mod:`.blobs`)."""
        return LocalBlobStore(self)

    # -- writing -----------------------------------------------------------------------
    def _ensure_root(self) -> None:
        with translate("mkdir", self.root):
            os.makedirs(self.root, exist_ok=True)

    def stage(self, name: str) -> str:
        return transaction.stage(self.root, name, self._fault)

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

    def serial(self) -> threading.RLock:
        """The mutex that orders saves to this root within the process (see rootlock)."""
        held = self._held
        return held.mutex if held is not None and held.alive else self._mutex

    def next_seq(self, listed: int) -> int:
        """A seq above ``listed`` that no other save of this process has taken."""
        return rootlock.next_seq(self._held, listed)

    def commit(self, staged: str, name: str) -> None:
        """Commit staging directory ``staged`` as ``name`` (:mod:`safepoint.storage.commit`)."""
        with self.serial():
            transaction.commit(self.root, staged, name, "directory", self._fault)

    def discard(self, staged: str) -> None:
        transaction.discard(self.root, staged)

    def remove(self, name: str) -> None:
        """Delete a committed checkpoint: move it into a marked trash entry, then remove.

        A crash between the two steps leaves a hidden trash entry that the next
        writer cleans up, never a half-deleted checkpoint that is still listed.
        """
        check_name(name)
        with translate("retention", self.describe(name)):
            self._fault("retention", name)
            trash = leftovers.make_trash(self.root, name, op="remove")
            try:
                os.rename(
                    os.path.join(self.root, name),
                    os.path.join(self.root, trash, leftovers.ENTRY),
                )
            except BaseException:
                shutil.rmtree(os.path.join(self.root, trash), ignore_errors=True)
                raise
        self._fsync_dir("", "retention")
        leftovers.remove_entry(os.path.join(self.root, trash))

    def cleanup_stale(self) -> list[str]:
        """Recover and remove what interrupted writers left; returns the entries removed.

        Only entries that are recognisably safepoint's are touched (see
        :mod:`safepoint.storage.leftovers`), never a staging entry of a save in flight in this
        process, and only under the writer lock (taken here if not held), so never
        while a writer in another process is live.
        """
        held = self._held is not None and self._held.alive
        if not held:
            self.lock()
        try:
            with self.serial():  # no save of this process is between its two renames
                return leftovers.clean(self.root, self.list_names())
        finally:
            if not held:
                self.unlock()

    def recover(self) -> list[str]:
        """Put back checkpoints a re-save cut short left out of the listing (see
        :mod:`safepoint.storage.leftovers`); a reader calls it before restoring. Takes the
        writer lock only when there is something to put back, and does nothing when a
        writer in another process holds it (that writer recovers at its lock time)."""
        if not leftovers.pending(self.root, self.list_names()):
            return []
        held = self._held is not None and self._held.alive
        if not held:
            try:
                self.lock()  # recovers
            except StorageError:
                return []
            self.unlock()
            return []
        with self.serial():
            return leftovers.recover(self.root, self.list_names())

    # -- the run log -------------------------------------------------------------------
    def append_log(self, line: str) -> None:
        data = (line.rstrip("\n") + "\n").encode()
        with translate("log", self.describe(LOG_NAME)):
            append_line(os.path.join(self.root, LOG_NAME), data)

    def read_log(self) -> bytes:
        """The run log (its last ``LOG_READ_MAX`` bytes, from a line start, if longer)."""
        try:
            with translate("read", self.describe(LOG_NAME)):
                return read_tail(os.path.join(self.root, LOG_NAME), LOG_READ_MAX)
        except StorageError as exc:
            if exc.errno == errno.ENOENT:
                return b""
            raise

    # -- the writer lock ---------------------------------------------------------------
    @property
    def _lock_fd(self) -> int | None:
        held = self._held
        return held.fd if held is not None and held.alive else None

    def lock(self) -> None:
        """Take the root's writer lock (``flock`` on the root directory itself).

        Holding it on the directory needs no lock file, and the kernel drops it when the
        process dies, so a crash never leaves a stale lock behind. Writers of one process
        share it (:mod:`safepoint.storage.rootlock`); another process is refused.
        """
        if self._held is not None and self._held.alive:
            return
        self._ensure_root()
        held = rootlock.acquire(self.root)
        self._held = held
        if held.refs == 1:  # first writer of this process: nothing of ours in flight
            with held.mutex:
                leftovers.recover(self.root, self.list_names())
        # A manager dropped without close() (a notebook cell, a one-off script) must not
        # hold the root for the rest of the process: release the lock when it is collected.
        self._release = weakref.finalize(self, rootlock.release, held)

    def unlock(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._release.detach()
            rootlock.release(held)


__all__ = ["FAULT_STAGES", "LOG_READ_MAX", "FaultHook", "LocalStorage"]
