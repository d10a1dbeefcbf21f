"""What a storage backend implements: :class:`Storage`, :class:`Writer` and the capabilities.

Everything above the storage layer (formats, catalog, manager, adapters, CLI) reaches
checkpoint bytes through these methods only. A backend for another kind of root (an
object store, a test's in-memory dict) implements :class:`Storage` and is complete;
:class:`LocalFiles` is an optional capability for roots that are local directories,
which unlocks the fast paths (memory-mapped reads, ``O_DIRECT`` writes, files handed
to h5py by path). Code that uses a capability checks it with ``isinstance`` and has a
portable path for backends without it.

Names: a *name* is one entry of the root (a checkpoint directory ``step-00000012``, a
single file ``weights.best.h5``, the run log); a *relpath* is ``name`` or
``name/file``. Backends refuse ``..``, ``/``, NUL and links in every component.

The calls a backend receives, in order:

**Save** (one writer per root, :meth:`Storage.lock` held from the manager's first save
until it closes)::

    lock()                           once; refuses a second live writer
    recover(); cleanup_stale()       once, after lock: repair an interrupted re-save,
                                     then remove staging entries of crashed saves
    with serial():                   per save, in-process writers of one root in turn
        next_seq(listed)             the save's sequence number
        staged = stage(name)         a private area, invisible to list_names()
        open_write(f"{staged}/F")    per payload file: write()* then close() (durable)
                                     or abort() (on failure)
        write_file(f"{staged}/manifest.json", data)   last: the commit record
        commit(staged, name)         atomically make ``name`` the staged checkpoint,
                                     replacing one of the same name; on failure the
                                     old one is still there
        or discard(staged)           on any failure before commit
        remove(old)                  retention, only after commit
        append_log(line)             best effort, after commit
    unlock()                         when the manager closes

**Restore / load / verify**::

    list_names(); is_dir(name)                  candidates, newest seq first after parse
    read_bytes("name/manifest.json", max_size)  parse and validate the manifest
    size(relpath); open_read(relpath)           each payload file: size checked first,
                                                then read whole (or mapped, LocalFiles)
    exists(relpath)                             telling "never committed" from "deleted"

Errors: a missing name is ``FileNotFoundError`` (an answer, not a fault); every other
failure is a :class:`safepoint.StorageError` naming the stage and the path, or a
:class:`safepoint.CorruptCheckpointError` for content that is not what a checkpoint
holds (a link, a FIFO). Backends translate their native errors in one place.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import BinaryIO, Protocol, runtime_checkable


class Writer(Protocol):
    """A payload file being written: ``write()`` any number of times, then ``close()``.

    ``close()`` returns only once the bytes are durable (local disks: ``fsync``) and
    raises otherwise; ``abort()`` releases the file without making it durable, and is
    what a failed save calls. Buffers passed to ``write`` may be reused by the caller
    once ``write`` returns.
    """

    def write(self, buffers: Sequence[memoryview]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    """The operations a checkpoint root needs, local disk or object store.

    ``root`` is the root as users write it (a path or a URL), used in messages.
    """

    root: str

    # -- reading: any process, any time, concurrently with the writer ----------------
    def list_names(self) -> list[str]:
        """Entries of the root, in no particular order; staging entries are left out."""
        ...

    def is_dir(self, name: str) -> bool:
        """Whether ``name`` is a checkpoint directory (not a single file, not missing)."""
        ...

    def exists(self, relpath: str) -> bool: ...

    def size(self, relpath: str) -> int:
        """Size in bytes of a file, checked before reading so nothing oversized is read."""
        ...

    def read_bytes(self, relpath: str, *, max_size: int) -> bytes:
        """A whole small file (a manifest); more than ``max_size`` bytes is refused."""
        ...

    def open_read(self, relpath: str) -> BinaryIO:
        """A file for reading, seekable; the caller closes it."""
        ...

    def read_log(self) -> bytes:
        """The run log (its newest part when large); ``b""`` when there is none."""
        ...

    # -- writing: the one writer of the root ---------------------------------------------
    def lock(self) -> None:
        """Become the root's only writer, or raise ``StorageError`` naming the holder."""
        ...

    def unlock(self) -> None: ...

    def serial(self) -> threading.RLock:
        """The lock that orders the saves of this process's managers on this root."""
        ...

    def next_seq(self, listed: int) -> int:
        """A sequence number above ``listed`` and above any this process handed out."""
        ...

    def recover(self) -> list[str]:
        """Finish or undo a re-save a crash interrupted; returns the names repaired."""
        ...

    def cleanup_stale(self) -> list[str]:
        """Remove staging entries left by crashed saves (never a live save's)."""
        ...

    def stage(self, name: str) -> str:
        """Open a private staging area for checkpoint ``name``; returns its relpath."""
        ...

    def open_write(self, relpath: str) -> Writer:
        """A new file inside a staging area."""
        ...

    def write_file(self, relpath: str, data: bytes, *, stage: str = "write") -> None:
        """A whole small file (the manifest) written and made durable."""
        ...

    def commit(self, staged: str, name: str) -> None:
        """Make the staged area checkpoint ``name``, atomically, replacing one of that name.

        Either the new checkpoint is listed afterwards, or (on an exception) the old one
        still is: never neither, never a mix.
        """
        ...

    def discard(self, staged: str) -> None:
        """Remove a staging area that will not be committed."""
        ...

    def remove(self, name: str) -> None:
        """Delete a committed checkpoint (retention); readers may still be reading it."""
        ...

    def append_log(self, line: str) -> None:
        """Append one JSON line to the run log; torn lines are skipped by readers."""
        ...


@runtime_checkable
class LocalFiles(Protocol):
    """Capability: the root is a local directory.

    Promises that ``open_read`` returns a real file (``fileno()`` works, so it can be
    mapped and read with ``preadv``), that ``local_path`` gives a path other libraries
    (h5py) can open, and that writers may use ``O_DIRECT``. An object store lacks it,
    and callers then use the portable :class:`Storage` methods.
    """

    def local_path(self, relpath: str) -> str | None:
        """The file's path on this machine (None where there is none)."""
        ...


class NewBlob(Protocol):
    """A blob being written by a save: ``key`` and the :class:`Writer` its bytes go to."""

    key: str
    writer: Writer


class BlobStore(Protocol):
    """One save's view of a root's content-addressed blobs (``dedup=True``, docs/dedup.md).

    The order a dedup save calls these (``catalog/dedup.py``): :meth:`prepare`;
    :meth:`key` per tensor to share; :meth:`link` for a blob the plan names, or
    :meth:`has` and :meth:`same_bytes` for one found by key, else :meth:`create`
    (write through its writer, ``close()`` it) and :meth:`settle` once for all new
    blobs before the manifest is written (:meth:`abort` on failure); :meth:`release`
    once the save committed or was discarded. A blob a committed record names is
    never removed while that record exists: :meth:`collect` frees only blobs no
    record and no save in flight references.
    """

    def prepare(self) -> None:
        """Make the store ready for writing (create its folder)."""
        ...

    def key(self, head: bytes, data: memoryview) -> str:
        """The content key (32 lowercase hex) of the blob file ``head + data``."""
        ...

    def has(self, key: str) -> bool: ...

    def same_bytes(self, key: str, parts: list[memoryview]) -> bool:
        """Whether blob ``key`` holds exactly ``parts``; a key match alone may be a collision."""
        ...

    def create(self, key: str) -> NewBlob:
        """A new blob to write; not visible under its key before :meth:`settle`."""
        ...

    def settle(self, new: Sequence[NewBlob]) -> None:
        """Make the written blobs durable and give them their keys (raises: none kept)."""
        ...

    def abort(self, new: Sequence[NewBlob]) -> None:
        """Drop blobs written but not settled (a failed save)."""
        ...

    def link(self, key: str, dst: str) -> bool:
        """Reference blob ``key`` as the staged file ``dst``; False when it is gone."""
        ...

    def release(self) -> None:
        """The save ended: its references are in its committed record, or gone."""
        ...

    def collect(self, *, grace_s: float, full: bool = True) -> tuple[int, int]:
        """Remove blobs no checkpoint references (``(count, bytes)`` freed); under the
        writer lock. ``full=False``: only those the last removals may have freed."""
        ...


@runtime_checkable
class SharedBlobs(Protocol):
    """Capability: the root can share a tensor's bytes between checkpoints (dedup)."""

    def blob_store(self) -> BlobStore:
        """A fresh view of the store for one save (or one collection)."""
        ...


def local_path(storage: Storage, relpath: str) -> str | None:
    """``relpath``'s path on this machine, or None for a root without :class:`LocalFiles`."""
    return storage.local_path(relpath) if isinstance(storage, LocalFiles) else None


__all__ = [
    "BlobStore",
    "LocalFiles",
    "NewBlob",
    "SharedBlobs",
    "Storage",
    "Writer",
    "local_path",
]
