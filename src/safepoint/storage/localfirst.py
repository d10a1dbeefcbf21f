"""Local-first roots: commit on a local disk at its speed, upload to the bucket behind.

``CheckpointManager("s3://bucket/run", local_first="/nvme/ckpt")`` saves each
checkpoint into the local directory with the local commit protocol (fsync, rename),
so ``save()`` returns at local-disk speed and a crash loses nothing committed. A
background thread then copies each committed checkpoint to the bucket with the S3
commit protocol (payload, then the conditional record), in ``seq`` order, and
deletes there what retention deleted here. The bucket is the run's root as every
other machine sees it; this machine reads its own copies first.

A name is read from the local directory when it holds it, else from the bucket;
listing is the union. A copy the bucket superseded or deleted while the job ran
elsewhere (the ledger, :mod:`safepoint.storage.ledger`, tells) is never read, never
uploaded, and removed once this process takes the root (``lock``), which also uploads
what a crash left local-only. Old checkpoints leave the bucket only after a pass whose
uploads all succeeded, so a failed or killed upload never empties it. ``unlock`` (the
manager's ``close``) waits for the uploads and raises ``StorageError`` naming those
that failed (they stay committed locally; the next writer here uploads them). The
copy itself is :mod:`safepoint.storage.transfer`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

from safepoint.errors import ConfigError, CorruptCheckpointError, StorageError
from safepoint.ondisk import manifest
from safepoint.storage import transfer
from safepoint.storage.ledger import Ledger
from safepoint.storage.local import LocalStorage
from safepoint.storage.protocol import Storage, Writer

log = logging.getLogger("safepoint")


class LocalFirstStorage:
    """A bucket root whose saves are committed in ``local`` first (see the module docstring)."""

    #: Managers keep the lock from their first save until ``close`` (releasing it after
    #: each framework file would wait for that file's upload): see ``WriterLock``.
    keep_lock = True

    def __init__(self, local: LocalStorage, remote: Storage, ledger: Ledger) -> None:
        self.local, self.remote, self.ledger = local, remote, ledger
        self.root = remote.root
        self._cond = threading.Condition()
        self._dirty = False
        self._busy = False
        self._stop = False
        self._users = 0
        self._removed: set[str] = set()
        self._lines: list[str] = []
        self._sent: dict[str, bytes] = {}  # name -> the record uploaded for it
        self._known: set[str] | None = None  # the bucket's names while we hold the root
        self._failed: dict[str, BaseException] = {}
        self._mine: set[str] = set()  # names this process committed locally
        self._thread: threading.Thread | None = None
        self._fault = local._fault
        self._stale: set[str] = {
            name
            for name, record in transfer.records(self.local).items()
            if not self.ledger.may_upload(
                name, record, transfer.record(self.remote, name), mine=False
            )
        }

    def describe(self, relpath: str = "") -> str:
        name = relpath.split("/", 1)[0]
        if name and self._is_local(name):
            return self.local.describe(relpath)
        return f"{self.root}/{relpath}" if relpath else self.root

    # -- which copy counts ------------------------------------------------------------------
    def _is_local(self, name: str) -> bool:
        with self._cond:
            if name in self._stale:
                return False
        return self.local.is_dir(name)

    # -- reading: the local copy when it counts -------------------------------------------
    def _remote_names(self) -> set[str]:
        with self._cond:
            if self._known is not None:
                return set(self._known)
        return set(self.remote.list_names())

    def _side(self, relpath: str) -> Storage:
        return self.local if self._is_local(relpath.split("/", 1)[0]) else self.remote

    def list_names(self) -> list[str]:
        with self._cond:
            stale = set(self._stale)
        return sorted((set(self.local.list_names()) - stale) | self._remote_names())

    def is_dir(self, name: str) -> bool:
        if self._is_local(name):
            return True
        with self._cond:
            if self._known is not None:
                return name in self._known
        return self.remote.is_dir(name)

    def exists(self, relpath: str) -> bool:
        return self._side(relpath).exists(relpath)

    def size(self, relpath: str) -> int:
        return self._side(relpath).size(relpath)

    def read_bytes(self, relpath: str, *, max_size: int) -> bytes:
        return self._side(relpath).read_bytes(relpath, max_size=max_size)

    def open_read(self, relpath: str) -> BinaryIO:
        return self._side(relpath).open_read(relpath)

    def read_log(self) -> bytes:
        return self.local.read_log() or self.remote.read_log()

    # -- the writer lock -------------------------------------------------------------------
    def lock(self) -> None:
        with self._cond:
            if self._users:
                return  # held already (every save of the manager calls this)
        key = os.path.realpath(self.local.root)
        with _LOCKED_GUARD:
            other = _LOCKED.get(key)
            if other is not None and other is not self:
                raise ConfigError(
                    f"Another manager of this process writes through the local_first "
                    f"directory {self.local.root} (to {other.root}). Expected one manager per "
                    "local_first directory. Received: a second one. Save both series through "
                    "one manager, or give each its own local_first directory."
                )
            _LOCKED[key] = self
        try:
            self.local.lock()
        except BaseException:
            _forget_lock(key, self)
            raise
        try:
            self.ledger.save()  # the directory now belongs to this root
            self.remote.lock()
            known = set(self.remote.list_names())
            with self._cond:
                stale = set(self._stale)
            for name in sorted(stale):
                if self.local.is_dir(name):
                    log.warning(
                        "safepoint: %s was superseded in %s while this job ran elsewhere; "
                        "removing the stale local copy",
                        self.local.describe(name),
                        self.root,
                    )
                    self.local.remove(name)
        except BaseException:
            self.local.unlock()
            _forget_lock(key, self)
            raise
        with self._cond:
            self._users = 1
            self._known = known
            self._stale -= stale
            self._stop = False
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="safepoint-upload", daemon=True
                )
                self._thread.start()
        self._wake()  # uploads what a crash left local-only

    def unlock(self) -> None:
        with self._cond:
            if not self._users:
                return
            self._users = 0
        try:
            self.flush()
        finally:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
                thread, self._thread = self._thread, None
                self._known = None
            if thread is not None and thread is not threading.current_thread():
                thread.join()
            try:
                self.remote.unlock()
            finally:
                self.local.unlock()
                _forget_lock(os.path.realpath(self.local.root), self)

    def flush(self) -> None:
        """Wait until every local commit and removal so far reached the bucket; raise
        ``StorageError`` naming the checkpoints that could not be uploaded (they stay
        committed locally, and the next writer on this machine uploads them)."""
        with self._cond:
            if self._failed:  # one more try before reporting
                self._dirty = True
                self._cond.notify_all()
            while (self._dirty or self._busy) and self._thread is not None:
                self._cond.wait()
            failed = dict(self._failed)
        if failed:
            first = next(iter(failed.values()))
            raise StorageError(
                f"{len(failed)} checkpoint(s) committed in {self.local.root} could not be "
                f"uploaded to {self.root}: {sorted(failed)}. Expected every local commit "
                f"uploaded. Received: {first}. They are safe on the local disk; a manager "
                "with the same local_first directory uploads them when it next saves.",
                stage="upload",
            ) from first

    # -- writing: locally, then queued for the bucket --------------------------------------
    def serial(self) -> threading.RLock:
        return self.local.serial()

    def next_seq(self, listed: int) -> int:
        return self.local.next_seq(listed)

    def recover(self) -> list[str]:
        return self.local.recover()

    def cleanup_stale(self) -> list[str]:
        return self.local.cleanup_stale() + self.remote.cleanup_stale()

    def stage(self, name: str) -> str:
        return self.local.stage(name)

    def open_write(self, relpath: str) -> Writer:
        return self.local.open_write(relpath)

    def write_file(self, relpath: str, data: bytes, *, stage: str = "write") -> None:
        self.local.write_file(relpath, data, stage=stage)

    def commit(self, staged: str, name: str) -> None:
        self.local.commit(staged, name)
        with self._cond:
            self._mine.add(name)
            self._stale.discard(name)
            self._removed.discard(name)
            self._failed.pop(name, None)
        self._wake()

    def discard(self, staged: str) -> None:
        self.local.discard(staged)

    def remove(self, name: str) -> None:
        if self.local.is_dir(name):
            self.local.remove(name)
        with self._cond:
            self._removed.add(name)
            self._sent.pop(name, None)
            self._mine.discard(name)
            self._stale.discard(name)
            self._failed.pop(name, None)
            if self._known is not None:
                self._known.discard(name)  # deleted for every reader of this manager now
        self._wake()

    def append_log(self, line: str) -> None:
        self.local.append_log(line)
        with self._cond:
            self._lines.append(line)
        self._wake()

    # -- the uploader ----------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._stop:
                    self._cond.wait()
                if self._stop and not self._dirty:
                    return
                self._dirty, self._busy = False, True
            try:
                self._sync()
            except BaseException as exc:  # reported by flush(); retried on the next wake
                log.warning("safepoint: uploading to %s failed: %s", self.root, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _sync(self) -> None:
        with self._cond:
            removed, self._removed = self._removed, set()
            lines, self._lines = self._lines, []
        uploaded_all = True
        for name, record in self._pending():
            try:
                transfer.copy_checkpoint(self.local, self.remote, name, record)
            except FileNotFoundError:
                uploaded_all = False
                continue  # removed or re-saved here meanwhile: the next pass sees it
            except Exception as exc:
                uploaded_all = False
                with self._cond:
                    if self.local.is_dir(name):
                        self._failed[name] = exc
                log.warning("safepoint: could not upload %s to %s: %s", name, self.root, exc)
                continue
            self.ledger.confirm(name, record)
            with self._cond:
                self._failed.pop(name, None)
                self._sent[name] = record
                if self._known is not None:
                    self._known.add(name)
        if uploaded_all:
            self._delete(removed)
        else:  # the bucket keeps its old checkpoints until the new ones are there
            with self._cond:
                self._removed |= removed
        for line in lines:
            try:
                self.remote.append_log(line)
            except Exception as exc:  # the log is informational; the local one has it
                log.warning("safepoint: could not append to the run log in %s: %s", self.root, exc)

    def _delete(self, removed: set[str]) -> None:
        for name in sorted(removed):
            if self.local.is_dir(name):
                continue  # saved again since
            try:
                self.remote.remove(name)
            except Exception as exc:
                with self._cond:
                    self._removed.add(name)  # retried on the next pass
                    self._failed[f"deleting {name}"] = exc
                continue
            self.ledger.forget(name)
            with self._cond:
                self._failed.pop(f"deleting {name}", None)
                if self._known is not None:
                    self._known.discard(name)

    def _pending(self) -> Iterator[tuple[str, bytes]]:
        """Local checkpoints the bucket lacks (or holds an older record of), oldest first."""
        found: list[tuple[int, str, bytes]] = []
        with self._cond:
            stale = set(self._stale)
        for name, record in transfer.records(self.local).items():
            if name in stale or self._sent.get(name) == record:
                continue
            try:
                seq = manifest.parse(record, where=f"{name}/{manifest.NAME}").seq
            except CorruptCheckpointError:
                continue
            remote = transfer.record(self.remote, name) if name in self._remote_names() else None
            if remote == record:
                self._sent[name] = record
                self.ledger.confirm(name, record)
                continue
            if not self.ledger.may_upload(name, record, remote, mine=name in self._mine):
                log.warning(
                    "safepoint: %s changed in %s since this directory last saw it; the "
                    "bucket's copy is kept and the local one is not uploaded",
                    name,
                    self.root,
                )
                with self._cond:
                    self._stale.add(name)
                continue
            found.append((seq, name, record))
        for _, name, record in sorted(found):
            yield name, record


#: The local_first directories a storage of this process holds, by real path.
_LOCKED: dict[str, LocalFirstStorage] = {}
_LOCKED_GUARD = threading.Lock()


def _forget_lock(key: str, storage: LocalFirstStorage) -> None:
    with _LOCKED_GUARD:
        if _LOCKED.get(key) is storage:
            del _LOCKED[key]


def open_local_first(local_dir: str, remote: Storage) -> LocalFirstStorage:
    """The storage of a bucket root committed first in ``local_dir``.

    The directory's ledger must belong to this root (:mod:`.ledger`); a directory
    that holds checkpoints but no ledger (a plain run root) is refused.
    """
    local = LocalStorage(local_dir)
    holds = bool(transfer.records(local))
    ledger = Ledger.load(local.root, remote.root, holds_checkpoints=holds)
    return LocalFirstStorage(local, remote, ledger)


__all__ = ["LocalFirstStorage", "open_local_first"]
