"""A checkpoint root in an S3 bucket: ``s3://BUCKET/PREFIX``, committed without a rename.

Keys below ``PREFIX/``: ``.sp-data/<save id>/<payload files>`` (one prefix per save),
``<name>/manifest.json`` (the commit record, whose user metadata ``safepoint-save``
names its payload), ``.sp-lease.json`` (the writer lease, :mod:`.lease`) and
``.sp-log/`` (the run log, one object per event). A save stages under a fresh save
id, uploads its payload (multipart above 16 MiB), and commits by writing the record
with ``If-None-Match: *`` (``If-Match`` on the ETag seen at stage time for a re-save)
after renewing the lease: the record's existence is the commit; a failed conditional
write that finds our own record is a retried success, anything else a lost race,
never overwritten. Retention deletes the record first, then the payload; payload no
record references is removed by :meth:`S3Storage.cleanup_stale` once older than a
grace period. docs/object-storage.md has the whole protocol and its costs.
"""

from __future__ import annotations

import errno
import io
import re
import secrets
import threading
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from safepoint.errors import CorruptCheckpointError, StorageError
from safepoint.ondisk.manifest import MAX_BYTES as MANIFEST_MAX
from safepoint.ondisk.manifest import NAME as MANIFEST_NAME
from safepoint.ondisk.names import BLOB_KEY_RE, BLOBS, STAGE_PREFIX, STAGE_RE, check_name
from safepoint.ondisk.names import split as _split
from safepoint.storage.s3 import blobs as s3_blobs
from safepoint.storage.s3 import config as s3_config
from safepoint.storage.s3 import log as s3_log
from safepoint.storage.s3 import writers
from safepoint.storage.s3.cleanup import DATA, Cleanup
from safepoint.storage.s3.client import S3Client
from safepoint.storage.s3.io import RangeFile, S3Writer
from safepoint.storage.s3.lease import DEFAULT_TTL, Lease, lost_race

RECORD = MANIFEST_NAME
#: A record larger than a manifest may be is refused before it is read.
MAX_RECORD = MANIFEST_MAX
SAVE_ATTR = "safepoint-save"
_SAVE_ID = re.compile(r"^[0-9a-f]{16}$")
#: Unreferenced payload younger than this may belong to a save in flight: kept.
DEFAULT_GRACE = 15 * 60.0
#: Small reads (a safetensors header) fetch this much; large reads bypass the buffer.
_READ_BUFFER = 1 << 20


@dataclass
class _Staged:
    name: str
    prior_etag: str | None
    prior_id: str | None
    prior_refs: dict[str, str]
    manifest: bytes | None = None


class S3Storage(Cleanup, s3_blobs.Shared):
    """A checkpoint root in an S3 (or S3-compatible) bucket.

    Construction checks endpoint, credentials and bucket with one LIST, so a typo
    fails before any training time is spent. ``share_lease``: writers of this process on
    the same root share one lease (:mod:`.writers`; what managers get from
    :func:`open_root`); without it this storage is a writer of its own, refused while
    any other holds the root, as a second process would be.
    """

    def __init__(
        self,
        root: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        lease_ttl: float = DEFAULT_TTL,
        stale_after: float = DEFAULT_GRACE,
        share_lease: bool = False,
    ) -> None:
        self.location = s3_config.parse_url(root)
        self.root = self.location.url
        config = s3_config.resolve(storage_options, s3_config.environ())
        self.client = S3Client(self.location, config)
        self.client.probe()
        self.stale_after = float(stale_after)
        self._lease = Lease(self.client, ttl=lease_ttl)
        self._staged: dict[str, _Staged] = {}
        self._ids: dict[str, str] = {}  # name -> save id of its record (cache)
        self._refs: dict[str, dict[str, str] | None] = {}  # name -> {file: blob} (dedup)
        self._mutex = threading.RLock()
        self._seq = 0
        self._release: weakref.finalize[Any, Any] | None = None
        self._held: writers.Held | None = None
        self._share = share_lease

    # -- hooks the local backend also offers ---------------------------------------------
    def _fault(self, stage: str, target: str) -> None:
        """Fault-injection seam (same stages as the local backend)."""

    def describe(self, relpath: str = "") -> str:
        return self.client.url(relpath) if relpath else self.root

    def serial(self) -> threading.RLock:
        held = self._held
        return held.mutex if held is not None else self._mutex

    def next_seq(self, listed: int) -> int:
        held = self._held
        with self.serial():
            if held is None:
                self._seq = max(listed, self._seq) + 1
                return self._seq
            held.seq = max(listed, held.seq) + 1
            return held.seq

    def recover(self) -> list[str]:
        return []  # nothing to put back: a commit never removes the name it replaces

    # -- keys ----------------------------------------------------------------------------
    def _staged_id(self, part: str) -> str:
        save_id = part[len(STAGE_PREFIX) :]
        if not STAGE_RE.match(part) or save_id not in self._staged:
            raise CorruptCheckpointError(
                f"Refusing a path into another save's staging area. Expected a staging "
                f"name handed out by this storage. Received: path={part!r}.",
                file=part,
            )
        return save_id

    def _save_id(self, name: str) -> str:
        found = self._ids.get(name)
        if found is None:
            self._read_record(name)
            found = self._ids[name]
        return found

    def _read_record(self, name: str) -> bytes:
        data, meta, attrs = self.client.get_capped(f"{name}/{RECORD}", MAX_RECORD)
        if data is None:  # never read into memory
            self._check_size(f"{name}/{RECORD}", int(meta["size"]), MAX_RECORD)
        assert data is not None
        save_id = attrs.get(SAVE_ATTR, "")
        if not _SAVE_ID.match(save_id):
            raise CorruptCheckpointError(
                f"{self.describe(f'{name}/{RECORD}')} does not name its payload. Expected "
                f"metadata {SAVE_ATTR!r} of 16 hex digits. Received: {SAVE_ATTR}={save_id!r}. "
                "It was not committed by safepoint's S3 backend; remove it.",
                file=f"{name}/{RECORD}",
            )
        refs = s3_blobs.references(data)  # None: not a manifest (collection stops)
        self._ids[name], self._refs[name] = save_id, refs
        return data

    def _key(self, relpath: str) -> str:
        """The object key (relative to the prefix) of ``relpath``; hostile paths refused."""
        parts = _split(relpath)
        head, rest = parts[0], "/".join(parts[1:])
        if STAGE_RE.match(head):
            return f"{DATA}/{self._staged_id(head)}/{rest}"
        if head == BLOBS and BLOB_KEY_RE.match(rest):
            return relpath
        if not rest:
            return head
        if rest == RECORD:
            return f"{head}/{RECORD}"
        save_id = self._save_id(head)
        blob = (self._refs.get(head) or {}).get(rest)
        return s3_blobs.blob_relpath(blob) if blob else f"{DATA}/{save_id}/{rest}"

    # -- reading -------------------------------------------------------------------------
    def list_names(self) -> list[str]:
        # A prefix can outlive its record (stores that keep empty "folders"), so each
        # candidate is checked; the catalog reads every record next anyway.
        dirs, _ = self.client.list_dirs("")
        names = sorted(d for d in dirs if d and not d.startswith(".") and "/" not in d)
        if len(names) <= 1:
            return [n for n in names if self.is_dir(n)]
        with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
            return [n for n, ok in zip(names, pool.map(self.is_dir, names), strict=True) if ok]

    def is_dir(self, name: str) -> bool:
        if "/" in name or name.startswith("."):
            return False
        return self.exists(f"{name}/{RECORD}")

    def read_bytes(self, relpath: str, *, max_size: int) -> bytes:
        parts = _split(relpath)
        staged = self._staged.get(parts[0][len(STAGE_PREFIX) :]) if len(parts) == 2 else None
        if staged is not None and parts[1] == RECORD and staged.manifest is not None:
            data = staged.manifest  # not uploaded before commit()
        elif len(parts) == 2 and parts[1] == RECORD and not STAGE_RE.match(parts[0]):
            data = self._read_record(parts[0])  # refreshes the name's save id
        else:
            key = self._key(relpath)
            size = self.client.head(key)["size"]
            self._check_size(relpath, size, max_size)
            data = self.client.get_range(key, 0, size)
        self._check_size(relpath, len(data), max_size)
        return data

    def _check_size(self, relpath: str, size: int, max_size: int) -> None:
        if size > max_size:
            raise CorruptCheckpointError(
                f"{self.describe(relpath)} is {size} bytes. Expected at most {max_size}. "
                "Received: an object too large to be a safepoint record; it was not written "
                "by safepoint.",
                file=relpath,
                expected=max_size,
                actual=size,
            )

    def open_read(self, relpath: str) -> BinaryIO:
        key = self._key(relpath)
        size = int(self.client.head(key)["size"])
        return cast(BinaryIO, io.BufferedReader(RangeFile(self.client, key, size), _READ_BUFFER))

    def size(self, relpath: str) -> int:
        return int(self.client.head(self._key(relpath))["size"])

    def exists(self, relpath: str) -> bool:
        try:
            key = self._key(relpath)
            if "/" not in key:  # a bare name: "exists" means committed
                key = f"{key}/{RECORD}"
            self.client.head(key)
            return True
        except FileNotFoundError:
            return False

    # -- writing -------------------------------------------------------------------------
    def stage(self, name: str) -> str:
        check_name(name)
        self._fault("stage", name)
        prior_etag = prior_id = None
        prior_refs: dict[str, str] = {}
        try:
            data, meta, attrs = self.client.get(f"{name}/{RECORD}", stage="stage")
            prior_etag, prior_id = meta["e_tag"], attrs.get(SAVE_ATTR)
            prior_refs = s3_blobs.references(data) or {}
        except FileNotFoundError:
            pass
        save_id = secrets.token_hex(8)
        with self._mutex:
            self._staged[save_id] = _Staged(name, prior_etag, prior_id, prior_refs)
            writers.LIVE.add(save_id)
        return f"{STAGE_PREFIX}{save_id}"

    def open_write(self, relpath: str) -> S3Writer:
        key = self._key(relpath)
        self._fault("open", relpath)
        return S3Writer(self.client, relpath, key, fault=self._fault)

    def write_file(self, relpath: str, data: bytes, *, stage: str = "write") -> None:
        parts = _split(relpath)
        self._fault(stage, relpath)
        if len(parts) == 2 and parts[1] == RECORD and STAGE_RE.match(parts[0]):
            # The manifest is the commit record: it goes up in commit(), conditionally.
            self._staged[self._staged_id(parts[0])].manifest = bytes(data)
            return
        self.client.put(self._key(relpath), data, stage=stage)

    def commit(self, staged: str, name: str) -> None:
        save_id = self._staged_id(staged)
        entry = self._staged[save_id]
        if entry.manifest is None or entry.name != name:
            raise StorageError(
                f"Cannot commit {staged!r} as {name!r}. Expected a staged save of that name "
                f"with its manifest written. Received: name={entry.name!r}, manifest "
                f"{'missing' if entry.manifest is None else 'present'}. This is a bug in the "
                "caller.",
                stage="manifest",
            )
        key = f"{name}/{RECORD}"
        with self.serial():
            self._lease.check()  # only a writer that provably holds the root commits
            self._fault("rename", name)
            mode: Any = "create" if entry.prior_etag is None else {"e_tag": entry.prior_etag}
            try:
                self.client.put(
                    key,
                    entry.manifest,
                    stage="manifest",
                    mode=mode,
                    attributes={SAVE_ATTR: save_id, "Content-Type": "application/json"},
                )
            except StorageError as exc:
                if exc.errno != errno.EEXIST or not self._is_ours(key, save_id, entry.manifest):
                    raise lost_race(self.root, name, exc) from exc
            del self._staged[save_id]
            writers.LIVE.discard(save_id)
            self._ids[name] = save_id
            self._refs[name] = s3_blobs.references(entry.manifest) or {}
        self._drop(entry.prior_refs)
        if entry.prior_id and _SAVE_ID.match(entry.prior_id) and entry.prior_id != save_id:
            self._delete_prefix(f"{DATA}/{entry.prior_id}/", stage="retention", quiet=True)

    def _is_ours(self, key: str, save_id: str, manifest: bytes) -> bool:
        """A retried conditional PUT whose first try landed finds our own record."""
        try:
            data, _, attrs = self.client.get(key, stage="manifest")
        except FileNotFoundError:
            return False
        return attrs.get(SAVE_ATTR) == save_id and data == manifest

    def discard(self, staged: str) -> None:
        save_id = staged[len(STAGE_PREFIX) :]
        if not STAGE_RE.match(staged):
            return
        with self._mutex:
            self._staged.pop(save_id, None)
            writers.LIVE.discard(save_id)
        self._delete_prefix(f"{DATA}/{save_id}/", stage="discard", quiet=True)

    def _delete_prefix(self, prefix: str, *, stage: str, quiet: bool = False) -> None:
        try:
            keys = [m["path"] for m in self.client.list_all(prefix, stage=stage)]
            for i in range(0, len(keys), 1000):
                self.client.delete(keys[i : i + 1000], stage=stage)
        except StorageError:
            if not quiet:
                raise  # else: unreferenced payload, removed by cleanup_stale later

    def remove(self, name: str) -> None:
        """Delete a committed checkpoint: its record first, then its payload."""
        check_name(name)
        self._fault("retention", name)
        save_id: str | None = None
        try:
            self._read_record(name)
            save_id = self._ids.pop(name)
            self._drop(self._refs.pop(name, None) or {})
        except FileNotFoundError:
            return
        except CorruptCheckpointError:
            pass  # a record that names no payload of ours: delete just the record
        self.client.delete([f"{name}/{RECORD}"], stage="retention")
        if save_id is not None:
            self._delete_prefix(f"{DATA}/{save_id}/", stage="retention", quiet=True)

    # -- the run log (one object per event: S3 has no append) ---------------------------
    def append_log(self, line: str) -> None:
        s3_log.append(self.client, line)

    def read_log(self) -> bytes:
        return s3_log.read(self.client)

    # -- the writer lease ----------------------------------------------------------------
    def lock(self) -> None:
        """Take the root's lease, or share the one this process holds (:mod:`.writers`)."""
        if self._held is not None and self._held.lease.held:
            return
        own = self._lease
        key = f"{self.client.endpoint}|{self.root}" if self._share else f"own:{id(self)}"
        held = writers.acquire(key, lambda: own)
        self._held, self._lease = held, held.lease
        # A storage dropped without unlock() (a notebook cell) must not keep the lease
        # for the rest of the process; at exit it is released too.
        self._release = weakref.finalize(self, writers.release, held)

    def unlock(self) -> None:
        release, self._release = self._release, None
        self._held = None
        if release is not None:
            release()  # writers.release: the last user of the process deletes the lease


def open_root(url: str, storage_options: Mapping[str, Any] | None = None) -> S3Storage:
    """The storage for an ``s3://`` root (what the manager and ``load`` call for URLs)."""
    return S3Storage(url, storage_options, share_lease=True)


if TYPE_CHECKING:
    from safepoint.storage.protocol import Storage

    def _is_a_storage(storage: S3Storage) -> Storage:
        return storage  # mypy checks here that S3Storage implements the protocol


__all__ = ["S3Storage", "S3Writer", "open_root"]
