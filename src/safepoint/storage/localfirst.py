"""Local-first roots: commit on a local disk at its speed, upload to the bucket behind.

``CheckpointManager("s3://bucket/run", local_first="/nvme/ckpt")`` saves each
checkpoint into the local directory with the local commit protocol (fsync, rename),
so ``save()`` returns at local-disk speed and a crash loses nothing committed. A
background thread then copies each committed checkpoint to the bucket with the S3
commit protocol (payload, then the conditional record), in ``seq`` order, and
deletes there what retention deleted here. The bucket is the run's root as every
other machine sees it; this machine reads its own copies first.

Where each name is read from: the local directory when it holds that name (newer or
equal to the bucket's copy, since this process is the root's only writer), else the
bucket. Listing is the union of both. A restarted writer on this machine uploads what
a crash left local-only as soon as it takes the root (``lock``), so the bucket catches
up without a save. ``unlock`` (the manager's ``close``) waits for the uploads and
raises ``StorageError`` if some could not be made (they stay committed locally, and
the next writer here uploads them).

Each uploaded file is read through the checkpoint directory opened once (a re-save of
the name cannot mix two versions) and hashed on the way: a local file that does not
match its manifest's checksum is not uploaded, and the error says so.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

from safepoint.errors import ConfigError, CorruptCheckpointError, StorageError
from safepoint.ondisk import checksum, manifest
from safepoint.ondisk.embedded import KEY
from safepoint.storage import held
from safepoint.storage.files import translate
from safepoint.storage.local import LocalStorage
from safepoint.storage.protocol import Storage, Writer

log = logging.getLogger("safepoint")

_CHUNK = 16 << 20


class LocalFirstStorage:
    """A bucket root whose saves are committed in ``local`` first (see the module docstring)."""

    def __init__(self, local: LocalStorage, remote: Storage) -> None:
        self.local, self.remote = local, remote
        self.root = remote.root
        self._cond = threading.Condition()
        self._dirty = False
        self._busy = False
        self._stop = False
        self._removed: set[str] = set()
        self._lines: list[str] = []
        self._sent: dict[str, bytes] = {}  # name -> the record uploaded for it
        self._known: set[str] | None = None  # the bucket's names while we hold the root
        self._failed: dict[str, BaseException] = {}
        self._thread: threading.Thread | None = None
        self._fault = local._fault

    def describe(self, relpath: str = "") -> str:
        name = relpath.split("/", 1)[0]
        if name and self.local.is_dir(name):
            return self.local.describe(relpath)
        return f"{self.root}/{relpath}" if relpath else self.root

    # -- reading: the local copy when there is one -----------------------------------------
    def _remote_names(self) -> set[str]:
        with self._cond:
            if self._known is not None:
                return set(self._known)
        return set(self.remote.list_names())

    def _side(self, relpath: str) -> Storage:
        return self.local if self.local.is_dir(relpath.split("/", 1)[0]) else self.remote

    def list_names(self) -> list[str]:
        return sorted(set(self.local.list_names()) | self._remote_names())

    def is_dir(self, name: str) -> bool:
        if self.local.is_dir(name):
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

    # -- writing: locally, then queued for the bucket --------------------------------------
    def lock(self) -> None:
        self.local.lock()
        try:
            _check_marker(self.local, self.root)  # another run may have taken it since
            _write_marker(self.local, self.root)
            self.remote.lock()
            known = set(self.remote.list_names())
        except BaseException:
            self.local.unlock()
            raise
        with self._cond:
            self._known = known
            self._stop = False
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="safepoint-upload", daemon=True
                )
                self._thread.start()
        self._wake()  # uploads what a crash left local-only

    def unlock(self) -> None:
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

    def flush(self) -> None:
        """Wait until every local commit and removal so far reached the bucket.

        Raises ``StorageError`` naming the checkpoints that could not be uploaded; they
        stay committed locally, and the next writer on this machine uploads them.
        """
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
            self._removed.discard(name)
        self._wake()

    def discard(self, staged: str) -> None:
        self.local.discard(staged)

    def remove(self, name: str) -> None:
        if self.local.is_dir(name):
            self.local.remove(name)
        with self._cond:
            self._removed.add(name)
            self._sent.pop(name, None)
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
            with self._cond:
                self._failed.pop(f"deleting {name}", None)
                if self._known is not None:
                    self._known.discard(name)
        for name, record in self._pending():
            try:
                self._upload(name, record)
            except FileNotFoundError:
                continue  # removed or re-saved here meanwhile: the next pass sees it
            except Exception as exc:
                with self._cond:
                    self._failed[name] = exc
                log.warning("safepoint: could not upload %s to %s: %s", name, self.root, exc)
                continue
            with self._cond:
                self._failed.pop(name, None)
                self._sent[name] = record
                if self._known is not None:
                    self._known.add(name)
        for line in lines:
            try:
                self.remote.append_log(line)
            except Exception as exc:  # the log is informational; the local one has it
                log.warning("safepoint: could not append to the run log in %s: %s", self.root, exc)

    def _pending(self) -> Iterator[tuple[str, bytes]]:
        """Local checkpoints whose record the bucket lacks (or holds another of), oldest first."""
        found: list[tuple[int, str, bytes]] = []
        for name in self.local.list_names():
            if name.startswith(".") or not self.local.is_dir(name):
                continue  # staging and trash entries, the run log
            try:
                record = self.local.read_bytes(
                    f"{name}/{manifest.NAME}", max_size=manifest.MAX_BYTES
                )
                seq = manifest.parse(record, where=f"{name}/{manifest.NAME}").seq
            except (FileNotFoundError, CorruptCheckpointError, StorageError):
                continue  # not a committed checkpoint (or one retention is removing)
            if self._sent.get(name) == record:
                continue
            if name in self._remote_names() and self._remote_record(name) == record:
                self._sent[name] = record
                continue
            found.append((seq, name, record))
        for _, name, record in sorted(found):
            yield name, record

    def _remote_record(self, name: str) -> bytes | None:
        try:
            return self.remote.read_bytes(f"{name}/{manifest.NAME}", max_size=manifest.MAX_BYTES)
        except FileNotFoundError:
            return None

    def _upload(self, name: str, record: bytes) -> None:
        """Copy committed checkpoint ``name`` to the bucket, one version, each file hashed."""
        view = held.hold(self.local, name)
        try:
            data = view.read_bytes(f"{name}/{manifest.NAME}", max_size=manifest.MAX_BYTES)
            if data != record:
                raise FileNotFoundError(name)  # re-saved since listed: the next pass
            found = manifest.parse(data, where=f"{name}/{manifest.NAME}")
            files = {f: info.get(checksum.ALGORITHM) for f, info in found.files.items()}
            if KEY in found.extra:
                files.setdefault(name, None)  # a framework file: sealed, checked by readers
            staged = self.remote.stage(name)
            try:
                for fname, expected in files.items():
                    self._copy(view, f"{name}/{fname}", f"{staged}/{fname}", expected)
                self.remote.write_file(f"{staged}/{manifest.NAME}", data, stage="manifest")
                self.remote.commit(staged, name)
            except BaseException:
                self.remote.discard(staged)
                raise
        finally:
            held.release(view)

    def _copy(self, view: LocalStorage, source: str, target: str, expected: str | None) -> None:
        hasher = checksum.Hasher()
        writer = self.remote.open_write(target)
        try:
            with view.open_read(source) as f:
                while chunk := f.read(_CHUNK):
                    hasher.update(chunk)
                    writer.write([memoryview(chunk)])
            if expected is not None and hasher.hexdigest() != expected:
                raise CorruptCheckpointError(
                    f"{self.local.describe(source)} does not match its manifest's checksum; "
                    "it was not uploaded. Expected the bytes that were committed. Received: "
                    "a damaged local file. Check the local disk.",
                    file=source,
                    expected=expected,
                    actual=hasher.hexdigest(),
                )
            writer.close()
        except BaseException:
            writer.abort()
            raise


def open_local_first(local_dir: str, remote: Storage) -> LocalFirstStorage:
    """The storage of a bucket root committed first in ``local_dir``.

    The directory records the root it mirrors (:data:`MARKER`, written by the first
    save): pointing another run's manager at it is refused, since its checkpoints
    would be uploaded into the wrong run.
    """
    local = LocalStorage(local_dir)
    _check_marker(local, remote.root)
    return LocalFirstStorage(local, remote)


#: The file in a local-first directory naming the bucket root it belongs to.
MARKER = ".safepoint-local-first.json"


def _check_marker(local: LocalStorage, root: str) -> None:
    path = os.path.join(local.root, MARKER)
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 10)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(
            f"Cannot read {path}: {exc}. Check the directory's permissions."
        ) from exc
    try:
        recorded = json.loads(data).get("root")
    except (ValueError, AttributeError):
        recorded = None
    if recorded != root:
        raise ConfigError(
            f"{local.root} is the local_first directory of another root. Expected one that "
            f"belongs to {root} (or a new one). Received: {MARKER} names {recorded!r}. Use a "
            "separate local_first directory for each run root."
        )


def _write_marker(local: LocalStorage, root: str) -> None:
    path = os.path.join(local.root, MARKER)
    if os.path.exists(path):
        return
    with translate("write", path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps({"root": root}).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


__all__ = ["MARKER", "LocalFirstStorage", "open_local_first"]
