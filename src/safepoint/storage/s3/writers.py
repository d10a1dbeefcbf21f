"""The writer lease of an S3 root, shared by every writer of this process on that root.

As on disk (:mod:`safepoint.storage.rootlock`), one *process* writes to a root at a
time, and inside it several managers may (two Keras ``ModelCheckpoint`` callbacks on
one bucket prefix, best + every epoch). They share one lease, counted and keyed by
endpoint and root URL, one save mutex (so two background commits never take one
``seq``) and the set of saves in flight, which cleanup must never touch whichever of
the process's storages runs it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from safepoint.storage.s3.lease import Lease


class BlobState:
    """What the dedup saves of this process know of a root's blobs (:mod:`.blobs`).

    ``refs`` counts the references of saves in flight (never collected); ``known`` maps
    keys seen in the store to their sizes (no HEAD per hinted tensor: only this process,
    the lease holder, deletes blobs), filled only while ``generation`` (bumped by every
    collection that deleted) did not move; ``verified`` holds the keys whose bytes this
    process uploaded or checked, ``bad`` those found damaged (uploaded again by the next
    save that has their bytes); ``dropped`` maps keys of records removed since the last
    collection to the monotonic time before which looking again is pointless (too young
    then). ``lock`` orders a save's reference-then-check against a collection's
    check-then-delete.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refs: Counter[str] = Counter()
        self.known: dict[str, int] = {}
        self.generation = 0
        self.verified: set[str] = set()
        self.bad: set[str] = set()
        self.dropped: dict[str, float] = {}


class Held:
    """One root leased by this process: the lease, its users, the save mutex, the seq,
    and the dedup saves' view of the blobs."""

    def __init__(self, key: str, lease: Lease) -> None:
        self.key = key
        self.lease = lease
        self.refs = 1
        self.mutex = threading.RLock()
        self.seq = 0
        self.blobs = BlobState()


_HELD: dict[str, Held] = {}
#: Reentrant: a storage collected by the garbage collector releases from a finalizer.
_GUARD = threading.RLock()
#: Save ids (16 random hex digits, unique across roots) staged and not yet ended here.
LIVE: set[str] = set()


def acquire(key: str, make: Callable[[], Lease]) -> Held:
    """Share the lease this process holds on root ``key``, or take a new one (``make``)."""
    with _GUARD:
        held = _HELD.get(key)
        if held is not None and held.lease.held:
            held.refs += 1
            return held
        lease = make()
        lease.acquire()  # raises StorageError while another process holds the root
        held = _HELD[key] = Held(key, lease)
        return held


def release(held: Held) -> None:
    """One user fewer; the last one deletes the lease object."""
    with _GUARD:
        held.refs -= 1
        if held.refs > 0:
            return
        if _HELD.get(held.key) is held:
            del _HELD[held.key]
    held.lease.release()


__all__ = ["LIVE", "BlobState", "Held", "acquire", "release"]
