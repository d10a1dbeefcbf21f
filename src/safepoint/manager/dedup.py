"""The plan of a dedup manager: which tensors to link, hash, or write without hashing.

A torch tensor whose storage pointer, offset, shape, dtype and version counter
(``_version``, bumped by every in-place write, optimizer steps included) are those
of the last save holds the same bytes, so its blob is reused without hashing or
copying (a *hint*). A tensor whose version moved and whose bytes changed at the last
save too (trainable weights, optimizer moments) is *predicted* changed: it is written
into the checkpoint's own file without hashing, as a plain save writes it -- so with
nothing frozen a dedup save costs what a plain one does. Hints and predictions are
only that: every ``rehash_every``-th save hashes everything again, a blob the store
lost is written again, and a prediction only ever makes a save write bytes it could
have shared. Numpy arrays have no version counter: one whose fingerprint changed since
the last save is predicted changed, any other is hashed.

Writes that bypass the version counter (through ``tensor.data``, or a numpy view of
the tensor's memory) are caught by the fingerprint (16 sampled slices) that confirms
every hint of a CPU tensor, unless they change none of the sampled bytes; then they are
invisible until the next re-hash: a program that changes a few elements of frozen
tensors that way should pass ``dedup_rehash_every=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import xxhash

from safepoint.catalog.dedup import (
    HASH,
    OWN,
    BlobRef,
    DedupStorage,
    Verdict,
    is_view,
    write_dedup_checkpoint,
)
from safepoint.errors import ConfigError
from safepoint.manager import options
from safepoint.ondisk.manifest import Manifest
from safepoint.state.tree import TensorLeaf, tensor_refs
from safepoint.storage.protocol import SharedBlobs, Storage

#: Every this many saves the hints are ignored and every tensor hashed.
REHASH_EVERY = 10


def _identity(source: Any) -> tuple[Any, ...] | None:
    """What must not change for a torch tensor's bytes to be unchanged (None: no hint)."""
    version = getattr(source, "_version", None)
    if version is None or not hasattr(source, "data_ptr"):
        return None
    try:
        storage = source.untyped_storage()
        # The storage object is part of the identity and so kept alive by the hints:
        # its address cannot be reused by another tensor while it is remembered.
        return (
            storage,
            storage.data_ptr(),
            source.data_ptr(),
            int(version),
            tuple(source.shape),
            str(source.dtype),
            str(source.device),
        )
    except (RuntimeError, TypeError):  # a tensor without storage (meta, sparse...)
        return None


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    # the storage objects differ per call: compare what they describe (the older one
    # is still held, so an equal address is the same memory)
    return a[1:] == b[1:]


#: A fingerprint samples this many slices of this many bytes of a tensor.
_SAMPLES, _SLICE = 16, 256


def _fingerprint(leaf: TensorLeaf) -> str | None:
    """A cheap digest of a few slices of a CPU tensor's bytes (None for other tensors:
    sampling a GPU tensor would copy it). Two tensors of equal size whose fingerprints
    differ have different bytes; equal fingerprints prove nothing. ~15 us for 4 MiB."""
    if not is_view(leaf):
        return None
    buf = leaf.buffer()
    size = buf.nbytes
    h = xxhash.xxh3_64()
    if size <= _SAMPLES * _SLICE:
        h.update(buf)
    else:
        step = (size - _SLICE) // (_SAMPLES - 1)
        for i in range(_SAMPLES):
            h.update(buf[i * step : i * step + _SLICE])
    return f"{size}:{h.hexdigest()}"


def optimizer_buffers(tree: Any) -> set[str]:
    """Keys of the tensors held in a torch optimizer's state (Adam moments, momentum
    buffers): the tensors under ``state`` of a dict that also has ``param_groups`` (the
    documented layout of ``Optimizer.state_dict()``, as the state tree records it).

    Such a buffer changes at every step and equals nothing else, so it never becomes a
    blob: even at a save that hashes everything (the first of a manager) it goes into
    the checkpoint's own file unhashed, which spares one hash, one store lookup and one
    blob file per buffer (two thirds of an Adam run's tensors) on the first save.
    """
    found: set[str] = set()
    stack = [tree]
    while stack:  # iteratively, as tensor_refs: no recursion limit
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if "state" in node and isinstance(node.get("param_groups"), list):
                found.update(tensor_refs(node["state"]))
            else:
                stack.extend(node.values())
    return found


@dataclass(frozen=True)
class _Known:
    """A tensor at the last save: its identity, its blob (None: in that checkpoint's
    own file, i.e. it was not equal to anything stored) and its fingerprint."""

    ident: tuple[Any, ...] | None  # None: a numpy array (no version counter)
    ref: BlobRef | None
    fp: str | None


class Hints:
    """Per-key identity of each tensor at the last save, and where its bytes went.

    The verdicts (see ``catalog/dedup.py``): same identity and a blob -> that blob;
    same identity, own bytes -> hash it (it stopped changing: make it a blob); changed
    identity after changed bytes -> :data:`OWN`, no hash; changed identity after shared
    bytes -> :data:`OWN` too when a fingerprint (a few sampled slices) proves the bytes
    differ from the last save's, else :data:`HASH` (an EMA of frozen weights changes
    its version, not its bytes); unknown -> hash. A re-hash save hashes everything,
    hinted or predicted.
    """

    def __init__(self, rehash_every: int = REHASH_EVERY) -> None:
        self.rehash_every = max(1, rehash_every)
        self._saves = 0
        self._known: dict[str, _Known] = {}
        self._pending: dict[str, tuple[Any, ...] | None] = {}
        self._fps: dict[str, str | None] = {}
        self._fresh = True
        self._buffers: set[str] = set()
        self.hits = 0
        self.predicted = 0

    def begin(self, leaves: list[TensorLeaf], buffers: set[str] | None = None) -> None:
        """Note each leaf's identity now (at snapshot time, before any copy), and which
        leaves are optimizer buffers (:func:`optimizer_buffers`)."""
        self._pending = {leaf.key: _identity(leaf.source) for leaf in leaves}
        self._buffers = buffers or set()
        self._fresh = self._saves % self.rehash_every == 0
        self._saves += 1
        self._fps = {}
        self.hits = self.predicted = 0

    def plan(self, leaf: TensorLeaf) -> Verdict:
        ident = self._pending.get(leaf.key)
        known = self._known.get(leaf.key)
        fresh = self._fresh
        if ident is None:  # numpy (no version counter): only the fingerprint predicts
            fp = self._fps[leaf.key] = _fingerprint(leaf)
            if known is not None and not fresh and fp and known.fp and fp != known.fp:
                self.predicted += 1
                return OWN
            return self._unknown(leaf)
        same = known is not None and known.ident is not None and _same(known.ident, ident)
        if known is not None and known.ref is not None and not fresh:
            if same:
                # Confirm the hint: a write through .data or a numpy view of the tensor
                # changes its bytes but not its version counter.
                fp = _fingerprint(leaf) if known.fp is not None else None
                if fp is None or fp == known.fp:
                    self.hits += 1
                    self._fps[leaf.key] = known.fp
                    return known.ref
                self._fps[leaf.key] = fp
                self.predicted += 1
                return OWN
        elif known is not None and not same and not fresh:
            self.predicted += 1  # changed after changed bytes: no fingerprint needed
            return OWN
        # becomes a blob or is compared with one: the next save compares fingerprints
        fp = self._fps[leaf.key] = _fingerprint(leaf)
        if known is None or same:
            return self._unknown(leaf)
        if not fresh and fp and known.fp and fp != known.fp:
            self.predicted += 1
            return OWN
        return HASH

    def _unknown(self, leaf: TensorLeaf) -> Verdict:
        """Hashed and made a blob, unless an optimizer buffer: never a blob, so nothing in
        the store can equal it by key, and it is neither hashed nor looked up."""
        if leaf.key in self._buffers:
            self.predicted += 1
            return OWN
        return None

    def commit(self, placed: dict[str, BlobRef | None], identities: dict[str, Any]) -> None:
        """Remember where a committed save put each tensor, under the identities noted
        at its start."""
        self._known = {
            key: _Known(ident, placed[key], self._fps.get(key))
            for key, ident in identities.items()
            if key in placed
        }

    def take(self) -> dict[str, tuple[Any, ...] | None]:
        """The identities noted by :meth:`begin` (handed to the save that uses them)."""
        return dict(self._pending)


__all__ = ["REHASH_EVERY", "Hints"]


#: An in-process collection after retention keeps blobs unreferenced for less than
#: this many seconds (another manager of this process may have just written one).
IN_PROCESS_GRACE_S = 10.0
#: A manager's first save collects every unreferenced blob older than this: what a
#: crashed save wrote and never committed (a writer of another process that held the
#: root this long ago is gone: the root's lock or lease is ours now).
STARTUP_GRACE_S = 15 * 60.0


class DedupSaving:
    """The dedup save path of a manager: hints noted at snapshot time, blobs written
    and linked at write time, unreferenced blobs collected after retention."""

    def __init__(self, storage: Storage, rehash_every: int, fmt: str) -> None:
        if fmt != "safetensors":
            raise ConfigError(
                "dedup=True writes safetensors blobs. Expected format='safetensors'. "
                f"Received: format={fmt!r}. Drop format= or dedup=True."
            )
        if not isinstance(storage, SharedBlobs):
            raise ConfigError(
                "dedup=True needs a root that can share bytes between checkpoints. Expected "
                "a local directory or an s3:// root without local_first. Received: "
                f"root={str(storage.root)!r} ({type(storage).__name__}). Use dedup=False "
                "here, or drop local_first= to deduplicate in the bucket itself."
            )
        self.storage: DedupStorage = storage  # type: ignore[assignment]
        self.hints = Hints(rehash_every)
        self._identities: dict[str, tuple[Any, ...] | None] = {}
        self._started = False

    def snapshot(self, leaves: list[TensorLeaf], tree: Any = None) -> None:
        """Note the tensors' identities before any copy (sync or async save)."""
        self.hints.begin(leaves, optimizer_buffers(tree))
        self._identities = self.hints.take()

    def write(self, draft: Manifest, leaves: list[TensorLeaf]) -> Manifest:
        if not self._started:
            self._started = True
            self.storage.blob_store().collect(grace_s=STARTUP_GRACE_S)
        manifest, refs = write_dedup_checkpoint(self.storage, draft, leaves, plan=self.hints.plan)
        self.hints.commit(refs, self._identities)
        return manifest

    def collect(self) -> None:
        # only the blobs the retention pass may have freed (a bucket's store is not listed)
        self.storage.blob_store().collect(grace_s=IN_PROCESS_GRACE_S, full=False)


def dedup_saving(storage: Storage, dedup: Any, rehash_every: Any, fmt: str) -> DedupSaving | None:
    """The manager's dedup path for ``dedup=``/``dedup_rehash_every=`` (validated)."""
    if not options.flag("dedup", dedup):
        return None
    return DedupSaving(storage, options.int_arg("dedup_rehash_every", rehash_every) or 1, fmt)


__all__ += ["IN_PROCESS_GRACE_S", "STARTUP_GRACE_S", "DedupSaving", "dedup_saving"]
