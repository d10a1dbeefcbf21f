"""Reading one version of a checkpoint while its writer may re-save or delete it.

A writer may re-save a name while it is read (a directory swapped in, the old one
deleted; on an object store, a new record and the old payload deleted) or its
retention may delete it. :func:`consistent` runs a read so that it sees one version
whole: on a local root through the directory opened once (and again from the top when
the name changed hands mid-read), on an object store again from the top when the record
changed mid-read. What was deleted is reported as deleted, never as damage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from safepoint.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from safepoint.ondisk import manifest
from safepoint.storage import held
from safepoint.storage.local import LocalStorage, Storage

_T = TypeVar("_T")

#: Reads of one checkpoint directory: a same-name re-save that deletes the version
#: being read (detected by the name's new inode) restarts the read from the top.
_ATTEMPTS = 3
#: What a reader racing that deletion may meet, before it looks at the name again.
_RACED = (CorruptCheckpointError, IncompleteCheckpointError, FileNotFoundError)
#: Seconds to wait, one after the other, for a name gone missing to come back: the gap
#: between the two renames of a re-save without RENAME_EXCHANGE is microseconds, but a
#: loaded machine can deschedule the writer between them.
ABSENT_WAITS = (0.01, 0.04, 0.16, 0.5)


def consistent(storage: Storage, name: str, read: Callable[[Storage], _T]) -> _T:
    """``read(view)`` of checkpoint directory ``name``, held open so it sees one version.

    The view reads every file relative to the directory opened once (see
    ``held.hold``). A writer re-saving the same name swaps a new directory
    in and deletes the old one; a read of the old one that then misses a file is
    started again from the top when the name has meanwhile changed hands.
    """
    if not isinstance(storage, LocalStorage):  # no directory descriptors (an object store)
        return _remote(storage, name, read)
    opened = False
    for attempt in range(_ATTEMPTS):
        try:
            view = held.hold(storage, name)
        except FileNotFoundError:
            if _comes_back(storage, name):
                continue
            if opened:
                raise deleted(storage, name) from None
            raise CheckpointNotFoundError(
                f"No checkpoint named {name!r} in {storage.root}. Expected one of the names "
                "'safepoint ls ROOT' prints."
            ) from None
        opened = True
        try:
            held.preopen(view, [f"{name}/{manifest.NAME}"])
            result = read(view)
        except _RACED:
            if attempt + 1 == _ATTEMPTS or not held.replaced(view):
                raise
            continue
        finally:
            held.release(view)
        if not storage.is_dir(name) and not _comes_back(storage, name):
            # Read whole, but deleted meanwhile (the writer's retention): a newer
            # checkpoint exists, which restore('latest') finds by listing again.
            raise deleted(storage, name)
        return result
    raise AssertionError("unreachable")  # pragma: no cover


def _remote(storage: Storage, name: str, read: Callable[[Storage], _T]) -> _T:
    """``read(storage)`` of checkpoint ``name`` in an object store, started again when a
    re-save of the name (which deletes the old payload) raced it: the record changed."""
    relpath = f"{name}/{manifest.NAME}"
    for attempt in range(_ATTEMPTS):
        try:
            before = storage.read_bytes(relpath, max_size=manifest.MAX_BYTES)
        except FileNotFoundError:
            before = None  # read() reports the absence in its own words
        try:
            return read(storage)
        except _RACED:
            try:
                now = storage.read_bytes(relpath, max_size=manifest.MAX_BYTES)
            except FileNotFoundError:
                now = None
            if before is None or now == before or attempt + 1 == _ATTEMPTS:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _comes_back(storage: Storage, name: str) -> bool:
    """True when the missing checkpoint directory ``name`` reappears within a short wait.

    Without RENAME_EXCHANGE a re-save renames the old directory away and the new one
    in; a reader that looks in between must not call the checkpoint deleted.
    """
    for wait in ABSENT_WAITS:
        time.sleep(wait)
        if storage.is_dir(name):
            return True
    return False


def raise_if_deleted(storage: Storage, name: str) -> None:
    """A payload is missing: if the manifest went too, the checkpoint was deleted.

    The writer's retention may remove a checkpoint that a reader in another process
    listed a moment before; that is not damage, and the caller (restore('latest'))
    must look again rather than report corruption.
    """
    if not storage.exists(f"{name}/{manifest.NAME}"):
        raise deleted(storage, name)


def deleted(storage: Storage, name: str) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"Checkpoint {name!r} in {storage.root} was deleted while it was being read "
        "(by the writer's retention). Expected it to stay until read. List the root "
        "again: newer checkpoints exist."
    )


__all__ = ["ABSENT_WAITS", "consistent", "deleted", "raise_if_deleted"]
