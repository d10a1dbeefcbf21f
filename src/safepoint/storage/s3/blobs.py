"""Dedup on a bucket: content-addressed blob objects that records reference.

S3 has no hard links, so a dedup checkpoint on a bucket references its shared
tensors by key: its record (the manifest) gives a file entry a ``blob`` field, and
the backend reads that file from ``PREFIX/.sp-blobs/<key>`` instead of from the
save's own ``.sp-data/<save id>/`` prefix (:func:`references`). A blob object is
written once, whole (one PUT, or a multipart upload that appears only when
completed), before the record that references it is committed, so a committed record
only ever names complete blobs.

**Key.** The first 128 bits of the SHA-256 of the blob file. On a local disk a blob
found by key is compared byte by byte before it is reused; here that would mean
downloading it, so the key itself must make a substitution infeasible: a SHA-256
prefix of 128 bits needs ~2^64 work for a constructed collision, where xxh3 needs
none. SHA-256 hashes ~1.4 GiB/s per core here (GIL released, a few threads at once),
cheaper than uploading the bytes it saves. Every read still verifies the manifest's
xxh3-64 of the tensor's bytes, so a blob damaged at rest is detected, not loaded; and
a writer checks a blob it did not upload once per process before reusing it, uploading
a damaged one again (:meth:`S3BlobStore.same_bytes`).

**Collection.** A blob is deleted only when no record of the root and no save in
flight in this process references it, by the lease holder (a manager after its
retention pass, looking only at the keys that pass dropped; ``safepoint gc`` and a
dedup manager's first save, looking at every blob), after renewing the lease, and only
once older than a grace period on the server's clock. Saves register each key they
reference (:class:`BlobState`) *before* checking that it exists, under the same lock
a collection holds from reading the registrations to its last delete: either the
collection sees the reference, or the save's check sees the blob gone and uploads it
again. Another process cannot collect while this one holds the lease; a writer that
lost its lease cannot commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safepoint.errors import CorruptCheckpointError, StorageError
from safepoint.ondisk.names import BLOB_KEY_RE, BLOBS
from safepoint.storage.protocol import Writer
from safepoint.storage.s3.writers import BlobState, Held

if TYPE_CHECKING:
    from safepoint.storage.s3.backend import S3Storage
    from safepoint.storage.s3.lease import Lease

log = logging.getLogger("safepoint")
#: A blob checked against its key is read in pieces of this size.
_CHECK_CHUNK = 8 << 20


def references(record: bytes) -> dict[str, str] | None:
    """``file -> blob key`` of a record's file entries that name a blob; None when the
    record is not a manifest at all (then what it references is unknown).

    Entries whose key is not 32 lowercase hex are left out: the manifest's own
    validation refuses such a record before any payload is read.
    """
    try:
        body = json.loads(record)
    except (ValueError, UnicodeDecodeError):
        return None
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, dict):
        return None
    out: dict[str, str] = {}
    for fname, info in files.items():
        key = info.get("blob") if isinstance(info, dict) else None
        if isinstance(fname, str) and isinstance(key, str) and BLOB_KEY_RE.match(key):
            out[fname] = key
    return out


def blob_relpath(key: str) -> str:
    return f"{BLOBS}/{key}"


class Shared:
    """The dedup half of ``S3Storage``: what its records reference, its blob store."""

    _refs: dict[str, dict[str, str] | None]
    _held: Held | None
    _lease: Lease

    def _read_record(self, name: str) -> bytes:
        raise NotImplementedError

    def record_refs(self, name: str) -> dict[str, str]:
        """``file -> blob key`` of the files of committed ``name`` that are shared blobs.

        Raises ``CorruptCheckpointError`` for a record that is not a manifest: what it
        references is unknown, so a collection must not delete anything.
        """
        self._read_record(name)
        refs = self._refs.get(name)
        if refs is None:
            raise CorruptCheckpointError(
                f"{name}/manifest.json is not a manifest. Expected a JSON object with a "
                "'files' object. Received: other content. Delete the damaged checkpoint (or "
                "restore its record from a backup); until then no dedup blob is collected.",
                file=f"{name}/manifest.json",
            )
        return dict(refs)

    def _drop(self, refs: Mapping[str, str]) -> None:
        """Keys a removed or replaced record referenced: candidates for collection."""
        held = self._held
        if refs and held is not None:
            with held.blobs.lock:
                held.blobs.dropped.update(dict.fromkeys(refs.values(), 0.0))

    def blob_store(self) -> S3BlobStore:
        """The root's dedup blobs, with this process's view of them."""
        held = self._held
        state = held.blobs if held is not None else BlobState()
        return S3BlobStore(self, state)  # type: ignore[arg-type]  # self is an S3Storage

    def holds_lease(self) -> bool:
        return self._lease.held

    def confirm_lease(self) -> None:
        """Renew the lease now (raises ``StorageError`` when it was lost): before deletes
        that must not happen once another writer took over."""
        self._lease.check()


class _Counted:
    """A writer that counts the bytes through it (the new blob's size, for ``known``)."""

    def __init__(self, inner: Writer) -> None:
        self._inner = inner
        self.size = 0

    def write(self, buffers: Sequence[memoryview]) -> None:
        self._inner.write(buffers)
        self.size += sum(b.nbytes for b in buffers)

    def close(self) -> None:
        self._inner.close()  # the upload completes: the object exists, whole

    def abort(self) -> None:
        self._inner.abort()


@dataclass
class _NewS3:
    key: str
    writer: _Counted


class S3BlobStore:
    """The :class:`~safepoint.storage.protocol.BlobStore` of an S3 root (module docstring)."""

    def __init__(self, storage: S3Storage, state: BlobState) -> None:
        self.storage = storage
        self.client = storage.client
        self.state = state
        self._mine: Counter[str] = Counter()  # this save's registered references

    def prepare(self) -> None:
        """Nothing to create: a prefix exists once an object is under it."""

    def key(self, head: bytes, data: memoryview) -> str:
        h = hashlib.sha256(head)
        h.update(data)
        return h.hexdigest()[:32]

    def has(self, key: str) -> bool:
        state = self.state
        with state.lock:
            if key in state.bad:
                return False
            if key in state.known:
                return True
            generation = state.generation
        size = self._head(key)
        if size is None:
            return False
        with state.lock:  # a collection since the HEAD may have deleted it: not cached
            if state.generation == generation and key not in state.bad:
                state.known[key] = size
        return True

    def _head(self, key: str) -> int | None:
        try:
            return int(self.client.head(blob_relpath(key), stage="blob")["size"])
        except FileNotFoundError:
            return None

    def same_bytes(self, key: str, parts: list[memoryview]) -> bool:
        """Whether blob ``key`` holds ``parts``: an equal key (a SHA-256 prefix) and size
        mean equal bytes, once the stored object was checked, which happens once per
        process for a blob this process did not upload (it is downloaded and hashed). A
        damaged blob is marked bad: the save uploads the bytes again, repairing every
        checkpoint that references it."""
        size = sum(p.nbytes for p in parts)
        if not self.has(key) or self.state.known.get(key, size) != size:
            return False
        if key in self.state.verified:
            return True
        if self._stored_key(key) == key:
            self.state.verified.add(key)
            return True
        with self.state.lock:
            self.state.bad.add(key)
            self.state.known.pop(key, None)
        log.warning(
            "safepoint: dedup blob %s does not hold the bytes its key names (damaged in the "
            "bucket); uploading it again",
            self.storage.describe(blob_relpath(key)),
        )
        return False

    def _stored_key(self, key: str) -> str | None:
        h = hashlib.sha256()
        try:
            with self.storage.open_read(blob_relpath(key)) as f:
                while chunk := f.read(_CHECK_CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            return None
        return h.hexdigest()[:32]

    def _register(self, key: str) -> None:
        self.state.refs[key] += 1
        self._mine[key] += 1

    def create(self, key: str) -> _NewS3:
        with self.state.lock:
            self._register(key)
        return _NewS3(key, _Counted(self.storage.open_write(blob_relpath(key))))

    def settle(self, new: Sequence[_NewS3]) -> None:
        """Nothing to wait for: each upload completed when its writer closed."""
        with self.state.lock:
            for n in new:
                self.state.known[n.key] = n.writer.size
                self.state.verified.add(n.key)
                self.state.bad.discard(n.key)

    def abort(self, new: Sequence[_NewS3]) -> None:
        for n in new:  # a completed one is left unreferenced, for a collection
            n.writer.abort()

    def link(self, key: str, dst: str) -> bool:
        """Reference blob ``key`` (the record names it; ``dst`` has no object of its own)."""
        state = self.state
        with state.lock:  # no collection between the registration and the check
            self._register(key)
            if key in state.bad:
                return False
            if key in state.known:
                return True
            size = self._head(key)
            if size is not None:
                state.known[key] = size
            return size is not None

    def release(self) -> None:
        with self.state.lock:
            self.state.refs -= self._mine
            self._mine.clear()

    # -- collection ----------------------------------------------------------------------
    def collect(self, *, grace_s: float, full: bool = True) -> tuple[int, int]:
        """Delete blobs no record and no save in flight references, older than ``grace_s``.

        ``full``: every blob of the store (``safepoint gc``, a manager's first save); else
        only the keys of records removed since the last collection (after retention),
        which costs no request at all when they were none or are known to be too young.
        Needs the lease, and renews it before each batch of deletes: a collector that
        stalled past its lease (another writer may have referenced the blob again since)
        deletes nothing.
        """
        state = self.state
        with state.lock:
            now_local = time.monotonic()
            examined = {k for k, t in state.dropped.items() if t <= now_local}
            if not full and not examined:
                return 0, 0
            if not self.storage.holds_lease():
                raise StorageError(
                    f"Collecting the blobs of {self.storage.root} needs the writer lease. "
                    "Expected the lease held by this process. Received: not held. This is "
                    "a bug in the caller.",
                    stage="cleanup",
                )
            found: dict[str, Any] = {}
            if full:
                for o in self.client.list_all(f"{BLOBS}/", stage="cleanup"):
                    key = o["path"][len(BLOBS) + 1 :]
                    if BLOB_KEY_RE.match(key):
                        found[key] = o
                if not found:
                    return 0, 0
            live = {k for k, n in state.refs.items() if n > 0}
            referenced = self._referenced()
            if referenced is None:
                return 0, 0
            if not full:
                for key in examined - referenced - live:
                    try:
                        found[key] = self.client.head(blob_relpath(key), stage="cleanup")
                    except FileNotFoundError:
                        state.known.pop(key, None)
            doomed = {k: m for k, m in found.items() if k not in referenced and k not in live}
            young: set[str] = set()
            if doomed and grace_s > 0:
                now = self.client.server_now()
                young = {
                    k
                    for k, m in doomed.items()
                    if (now - m["last_modified"]).total_seconds() <= grace_s
                }
                doomed = {k: m for k, m in doomed.items() if k not in young}
            keys = sorted(doomed)
            for i in range(0, len(keys), 1000):
                self.storage.confirm_lease()
                self.client.delete([blob_relpath(k) for k in keys[i : i + 1000]], stage="cleanup")
            if keys:
                state.generation += 1
            for k in keys:
                state.known.pop(k, None)
                state.verified.discard(k)
            for k in examined:  # still candidates: too young, or a save's that may yet fail
                if k in young:
                    state.dropped[k] = now_local + grace_s
                elif k not in live:
                    state.dropped.pop(k, None)
            return len(keys), sum(int(m["size"]) for m in doomed.values())

    def _referenced(self) -> set[str] | None:
        """Every blob key the root's records reference (None: a record could not be read,
        so nothing may be deleted)."""
        names = self.storage.list_names()

        def refs(name: str) -> dict[str, str] | None:
            try:
                return self.storage.record_refs(name)
            except FileNotFoundError:
                return {}  # removed meanwhile (only by this process: we hold the lease)
            except CorruptCheckpointError as exc:
                log.warning("safepoint: not collecting blobs: %s", exc)
                return None

        with ThreadPoolExecutor(max_workers=max(1, min(16, len(names)))) as pool:
            found = list(pool.map(refs, names))
        if any(r is None for r in found):
            return None
        return {key for r in found if r is not None for key in r.values()}


__all__ = ["S3BlobStore", "Shared", "blob_relpath", "references"]
