"""Writing a dedup checkpoint: shared blobs referenced, plus the save's own file.

The checkpoint looks like any sharded checkpoint. A tensor that is shared is a
one-tensor file ``model-NNNNN.safetensors`` (named ``t`` inside, so equal bytes under
different keys -- EMA weights equal to the model's -- are one blob) whose file entry in
the manifest carries the optional ``blob`` key; the root's blob store
(:class:`~safepoint.storage.protocol.BlobStore`) makes that file the blob: a hard link
on a local disk, the blob object itself on S3. The tensors that changed go into the
checkpoint's own ``own-NNNNN.safetensors``, written as a plain save writes a shard,
without a ``blob`` key. Readers need nothing else.

The manager's plan gives each tensor a verdict (``manager/dedup.py`` decides):

- a :class:`BlobRef`: provably unchanged since the last save: link that blob;
- :data:`OWN`: predicted changed (its version counter moved, and its bytes changed at
  the last save too: trainable weights, optimizer moments): not hashed, own file;
- :data:`HASH`: changed identity, not known to change: hashed; linked when equal bytes
  are in the store (an EMA of frozen weights, updated in place), else own file;
- None (never seen, or unchanged but unshared): hashed; linked when equal bytes are in
  the store, else written as a new blob, so that the next save can share it.

Order (crash safety): the tensors to share are hashed by a few threads; new blobs are
written by them too and made durable together before they get their keys
(:meth:`~safepoint.storage.protocol.BlobStore.settle`); every blob is linked into the
staging area, the own files are written there, the manifest is written last and the
save committed by the one commit transaction. So a committed manifest only ever
names durable bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np

from safepoint.formats import SHARD_BYTES, shards
from safepoint.formats.safetensors import header_bytes
from safepoint.ondisk import checksum
from safepoint.ondisk.container import CONTAINER
from safepoint.ondisk.manifest import NAME as MANIFEST_NAME
from safepoint.ondisk.manifest import Manifest
from safepoint.state.tree import TensorLeaf
from safepoint.storage import blob_writes, payload_write
from safepoint.storage.protocol import BlobStore, NewBlob, SharedBlobs, Storage, Writer

#: The tensor's name inside every blob file.
INNER = "t"
#: Verdict: predicted changed; into the own file without hashing.
OWN: Literal["own"] = "own"
#: Verdict: hash; link equal bytes of the store, else into the own file.
HASH: Literal["hash"] = "hash"


@dataclass(frozen=True)
class BlobRef:
    """What a manifest records of one blob: its key, file size and xxh3."""

    key: str
    size: int
    digest: str


Verdict = BlobRef | Literal["own", "hash"] | None
#: ``plan(leaf)``: the leaf's verdict (see the module docstring).
Plan = Callable[[TensorLeaf], Verdict]


@dataclass
class _Item:
    """A tensor to hash and share: its file in the checkpoint, its blob's header, and
    whether it may become a new blob (verdict None) or only link one (:data:`HASH`).

    ``buf`` is kept only when it is a view of the tensor's memory (a CPU tensor or
    array, contiguous): a copy (a GPU tensor's) is made again when written, so that a
    save never holds a second copy of the whole state.
    """

    fname: str
    leaf: TensorLeaf
    head: bytes
    new_blob: bool
    buf: memoryview | None = None

    def parts(self) -> list[memoryview]:
        return [memoryview(self.head), self.buf if self.buf is not None else self.leaf.buffer()]


class DedupStorage(Storage, SharedBlobs, Protocol):
    """A root that can share bytes between checkpoints (local disk, S3)."""


def write_dedup_checkpoint(
    storage: DedupStorage,
    draft: Manifest,
    leaves: Sequence[TensorLeaf],
    *,
    plan: Plan,
    shard_bytes: int = SHARD_BYTES,
) -> tuple[Manifest, dict[str, BlobRef | None]]:
    """Commit ``draft`` with the tensors of ``leaves`` as shared blobs or own files.

    Returns the manifest and each leaf's blob (None: in the checkpoint's own bytes),
    for the next save's plan.
    """
    store = storage.blob_store()
    store.prepare()
    staged = storage.stage(draft.name)
    placed: dict[str, BlobRef | None] = {}
    where: dict[str, tuple[str, str]] = {}  # leaf key -> (file, name inside)
    files: dict[str, dict[str, object]] = {}
    try:
        own: list[TensorLeaf] = []
        hashed: list[_Item] = []
        for index, leaf in enumerate(leaves):
            verdict = plan(leaf)
            if verdict == OWN:
                own.append(leaf)
                continue
            fname = f"model-{index:05d}.safetensors"
            if isinstance(verdict, BlobRef) and store.link(verdict.key, f"{staged}/{fname}"):
                placed[leaf.key] = verdict
                where[leaf.key] = (fname, INNER)
                files[fname] = _entry(verdict)
                continue
            head = header_bytes([replace(leaf, key=INNER)])
            hashed.append(_Item(fname, leaf, head, new_blob=verdict != HASH))
        shared = _Sharing(storage, store, hashed)
        own += shared.own  # hashed, unequal to anything stored
        groups = list(shards(own, shard_bytes)) if own else []
        names = [f"own-{i:05d}.safetensors" for i in range(len(groups))]
        written: dict[str, tuple[int, str]] = {}
        pairs = zip(names, groups, strict=True)
        tasks = [_own_task(storage, staged, n, g, written) for n, g in pairs]
        try:
            for window in shared.windows():  # the own files are written with the first
                blob_writes.run_all([*tasks, *window])
                tasks = []
                shared.settle()
        except BaseException:
            shared.abort()
            raise
        for fname, group in zip(names, groups, strict=True):
            size, digest = written[fname]
            files[fname] = {"size": size, checksum.ALGORITHM: digest}
            for leaf in group:
                placed[leaf.key] = None
                where[leaf.key] = (fname, leaf.key)
        shared.link(staged, placed, where, files)
        manifest = replace(
            draft,
            files=files,
            tensors={
                leaf.key: {**leaf.entry(), "file": where[leaf.key][0], "name": where[leaf.key][1]}
                for leaf in leaves
            },
            payload="safetensors",
            extra={**draft.extra, CONTAINER: "directory", "dedup": True},
        )
        storage.write_file(f"{staged}/{MANIFEST_NAME}", manifest.to_bytes(), stage="manifest")
        storage.commit(staged, draft.name)
    except BaseException:
        storage.discard(staged)
        raise
    finally:
        store.release()
    return manifest, placed


def _entry(ref: BlobRef) -> dict[str, object]:
    out: dict[str, object] = {"size": ref.size, checksum.ALGORITHM: ref.digest}
    if ref.key:  # "": this checkpoint's own bytes (a key collision), not shared
        out["blob"] = ref.key
    return out


def _own_task(
    storage: Storage,
    staged: str,
    fname: str,
    leaves: list[TensorLeaf],
    written: dict[str, tuple[int, str]],
) -> Callable[[], None]:
    """Writing ``leaves`` into the own file ``fname`` (as a plain save writes a shard)."""

    def task() -> None:
        head = header_bytes(leaves)
        total = len(head) + sum(leaf.nbytes for leaf in leaves)
        parts = (leaf.buffer() for leaf in leaves)  # one at a time, as a plain save
        written[fname] = _write(storage, f"{staged}/{fname}", [memoryview(head), *parts], total)

    return task


def _write(
    storage: Storage, relpath: str, parts: Iterable[memoryview], total: int
) -> tuple[int, str]:
    """Write and fsync one file of ``parts`` (``total`` bytes); its ``(size, xxh3)``."""
    return _stream(storage.open_write(relpath), parts, total)


def _stream(writer: Writer, parts: Iterable[memoryview], total: int) -> tuple[int, str]:
    """Stream ``parts`` through ``writer`` and close it; its ``(size, xxh3)``."""
    stream = payload_write.PayloadStream(writer, size_hint=total)
    try:
        for part in parts:
            stream.write(part)
    except BaseException:
        stream.abort()
        raise
    return stream.close()


def is_view(leaf: TensorLeaf) -> bool:
    """Whether ``leaf.buffer()`` is a view of the tensor's memory rather than a copy."""
    src = leaf.source
    if isinstance(src, np.ndarray):
        return bool(src.flags.c_contiguous) and src.dtype.byteorder != ">"
    device = getattr(src, "device", None)
    return getattr(device, "type", None) == "cpu" and bool(src.is_contiguous())


def _equal(a: memoryview, b: memoryview) -> bool:
    """Byte equality of two buffers, compared a slice at a time (no copy of either)."""
    if a.nbytes != b.nbytes:
        return False
    x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    step = 1 << 20
    return all(np.array_equal(x[i : i + step], y[i : i + step]) for i in range(0, x.size, step))


@dataclass
class _Group:
    """What became of the tensors of one key: those sharing its blob, those written
    unshared (equal key, other bytes), the blob's size and xxh3."""

    shared: list[_Item]
    unshared: list[_Item]
    size: int = 0
    digest: str = ""


class _Sharing:
    """The tensors of a save to hash and share: grouped by key; each group linked to
    an equal blob of the store, or its blob written once."""

    def __init__(self, storage: Storage, store: BlobStore, items: list[_Item]) -> None:
        self.storage, self.store = storage, store
        keys: list[str] = [""] * len(items)

        def hash_one(i: int) -> Callable[[], None]:
            def task() -> None:
                item = items[i]
                buf = item.leaf.buffer()
                keys[i] = store.key(item.head, buf)
                if is_view(item.leaf):
                    item.buf = buf

            return task

        blob_writes.run_all([hash_one(i) for i in range(len(items))])  # hashes drop the GIL
        groups: dict[str, list[_Item]] = {}
        for key, item in zip(keys, items, strict=True):
            groups.setdefault(key, []).append(item)
        #: the tensors hashed in vain: no equal bytes stored, and not to become a blob
        self.own: list[TensorLeaf] = []
        self.groups: dict[str, list[_Item]] = {}
        for key, members in groups.items():
            if any(m.new_blob for m in members) or store.has(key):
                self.groups[key] = members
            else:
                self.own += [m.leaf for m in members]
        self.done: dict[str, _Group] = {}
        self.pending: list[NewBlob] = []  # written, not yet settled

    def windows(self) -> list[list[Callable[[], None]]]:
        """The groups' tasks, in windows of at most ``HELD_MAX`` (at least one window)."""
        tasks = [self._task(key, members) for key, members in self.groups.items()]
        step = blob_writes.HELD_MAX
        return [tasks[i : i + step] for i in range(0, len(tasks), step)] or [[]]

    def _task(self, key: str, members: list[_Item]) -> Callable[[], None]:
        def task() -> None:
            first = members[0].parts()
            group = _Group([members[0]], [])
            for m in members[1:]:
                (group.shared if _equal(m.parts()[1], first[1]) else group.unshared).append(m)
            store = self.store
            if store.has(key):
                if not store.same_bytes(key, first) and store.has(key):
                    # a hash collision (or a damaged blob): nothing of this key is shared
                    self.done[key] = _Group([], members)
                    return
                if store.has(key):  # the equal blob is still there: link it
                    hasher = checksum.Hasher()
                    hasher.update_all(first)
                    group.size, group.digest = sum(p.nbytes for p in first), hasher.hexdigest()
                    self.done[key] = group
                    return
            group.size, group.digest = self._write_new(key, first)
            self.done[key] = group

        return task

    def _write_new(self, key: str, parts: list[memoryview]) -> tuple[int, str]:
        new = self.store.create(key)
        self.pending.append(new)
        return _stream(new.writer, parts, sum(p.nbytes for p in parts))

    def settle(self) -> None:
        """Make the new blobs durable (all fsynced together), then give them their keys."""
        new, self.pending = self.pending, []
        self.store.settle(new)

    def abort(self) -> None:
        """Close and remove the blobs written but not published (a failed save)."""
        new, self.pending = self.pending, []
        self.store.abort(new)

    def link(
        self,
        staged: str,
        placed: dict[str, BlobRef | None],
        where: dict[str, tuple[str, str]],
        files: dict[str, dict[str, object]],
    ) -> None:
        """Link each shared tensor's blob into ``staged``; write the unshared ones there."""
        for key, group in self.done.items():
            ref = BlobRef(key, group.size, group.digest)
            unshared = list(group.unshared)
            for item in group.shared:
                if self.store.link(key, f"{staged}/{item.fname}"):
                    placed[item.leaf.key] = ref
                    where[item.leaf.key] = (item.fname, INNER)
                    files[item.fname] = _entry(ref)
                else:  # collected since it was found: this checkpoint keeps its own copy
                    unshared.append(item)
            for item in unshared:
                parts = item.parts()
                total = sum(p.nbytes for p in parts)
                size, digest = _write(self.storage, f"{staged}/{item.fname}", parts, total)
                placed[item.leaf.key] = None
                where[item.leaf.key] = (item.fname, INNER)
                files[item.fname] = _entry(BlobRef("", size, digest))


__all__ = [
    "HASH",
    "INNER",
    "OWN",
    "BlobRef",
    "DedupStorage",
    "Plan",
    "Verdict",
    "is_view",
    "write_dedup_checkpoint",
]
