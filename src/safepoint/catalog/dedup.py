"""Writing a dedup checkpoint: one content-addressed blob per tensor, hard-linked in.

The checkpoint directory looks like any sharded checkpoint (``model-NNNNN.safetensors``,
one tensor each, named ``t`` inside its file so equal bytes under different keys --
EMA weights equal to the model's -- are one blob). Each file entry of the manifest
carries the optional ``blob`` key; readers need nothing else. See docs/dedup.md.

Order (crash safety): a new blob is written and fsynced under a temporary name, then
renamed to its key; every blob is hard-linked into the staging directory; the
manifest is written last and the directory committed by the one commit transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import xxhash

from safepoint.formats.safetensors import header_bytes
from safepoint.ondisk import checksum
from safepoint.ondisk.container import CONTAINER
from safepoint.ondisk.manifest import NAME as MANIFEST_NAME
from safepoint.ondisk.manifest import Manifest
from safepoint.state.tree import TensorLeaf
from safepoint.storage import blobs, payload_write
from safepoint.storage.local import LocalStorage

#: The tensor's name inside every blob file.
INNER = "t"


@dataclass(frozen=True)
class BlobRef:
    """What a manifest records of one blob: its key, file size and xxh3."""

    key: str
    size: int
    digest: str


#: ``hint(leaf)``: the blob this leaf had at the last save when it provably did not
#: change since (torch storage pointer and version counter), else None.
Hint = Callable[[TensorLeaf], BlobRef | None]


def blob_key(head: bytes, buf: memoryview) -> str:
    """The content key: xxh3-128 over the whole blob file (header and bytes).

    Not cryptographic, and it need not be: a blob is only reused after a byte-by-byte
    comparison (:func:`safepoint.storage.blobs.same_bytes`), so a constructed collision
    costs the colliding tensor its sharing, never its content. xxh3-128 hashes at
    ~8.8 GiB/s here against ~0.7 GiB/s for sha256 (docs/dedup.md).
    """
    h = xxhash.xxh3_128(head)
    h.update(buf)
    return h.hexdigest()


def write_dedup_checkpoint(
    storage: LocalStorage, draft: Manifest, leaves: Sequence[TensorLeaf], *, hint: Hint
) -> tuple[Manifest, dict[str, BlobRef]]:
    """Commit ``draft`` with the tensors of ``leaves`` as shared blobs.

    Returns the manifest and each leaf's blob (for the next save's hints).
    """
    root = str(storage.root)
    blobs.ensure(root)
    staged = storage.stage(draft.name)
    refs: dict[str, BlobRef] = {}
    files: dict[str, dict[str, object]] = {}
    tensors: dict[str, dict[str, object]] = {}
    try:
        for index, leaf in enumerate(leaves):
            fname = f"model-{index:05d}.safetensors"
            ref = _place(storage, root, leaf, f"{staged}/{fname}", hint(leaf))
            refs[leaf.key] = ref
            files[fname] = {"size": ref.size, checksum.ALGORITHM: ref.digest}
            if ref.key:  # "": this checkpoint's own bytes (a key collision), not shared
                files[fname]["blob"] = ref.key
            tensors[leaf.key] = {**leaf.entry(), "file": fname, "name": INNER}
        manifest = replace(
            draft,
            files=files,
            tensors=tensors,
            payload="safetensors",
            extra={**draft.extra, CONTAINER: "directory", "dedup": True},
        )
        storage.write_file(f"{staged}/{MANIFEST_NAME}", manifest.to_bytes(), stage="manifest")
        storage.commit(staged, draft.name)
    except BaseException:
        storage.discard(staged)
        raise
    return manifest, refs


def _place(
    storage: LocalStorage, root: str, leaf: TensorLeaf, dst: str, known: BlobRef | None
) -> BlobRef:
    """Link the blob of ``leaf`` to ``dst``, writing it first when the store lacks it."""
    if known is not None and blobs.link(root, known.key, dst):
        return known
    inner = replace(leaf, key=INNER)
    head = header_bytes([inner])
    buf = leaf.buffer()
    key = blob_key(head, buf)
    parts = [memoryview(head), buf]
    if blobs.has(root, key):
        if blobs.same_bytes(root, key, parts) and blobs.link(root, key, dst):
            hasher = checksum.Hasher()
            hasher.update_all(parts)
            return BlobRef(key, len(head) + buf.nbytes, hasher.hexdigest())
        if blobs.has(root, key):  # a hash collision (or a damaged blob): keep it unshared
            return _own(storage, dst, parts)
    temp = blobs.temp_relpath()
    stream = payload_write.PayloadStream(storage.open_write(temp), size_hint=len(head) + buf.nbytes)
    try:
        stream.write(memoryview(head))
        stream.write(buf)
    except BaseException:
        stream.abort()
        blobs.discard(root, temp)
        raise
    try:
        size, digest = stream.close()
        blobs.publish(root, temp, key)
    except BaseException:
        blobs.discard(root, temp)
        raise
    if not blobs.link(root, key, dst):  # collected between publish and link: not ours
        raise FileNotFoundError(f"blob {key} vanished before it was linked")
    return BlobRef(key, size, digest)


def _own(storage: LocalStorage, dst: str, parts: list[memoryview]) -> BlobRef:
    """Write the bytes as this checkpoint's own file (no blob key: never shared)."""
    stream = payload_write.PayloadStream(storage.open_write(dst), size_hint=0)
    try:
        for part in parts:
            stream.write(part)
    except BaseException:
        stream.abort()
        raise
    size, digest = stream.close()
    return BlobRef("", size, digest)


__all__ = ["INNER", "BlobRef", "Hint", "blob_key", "write_dedup_checkpoint"]
