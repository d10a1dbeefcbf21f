"""The commit transaction: how staged bytes become a committed checkpoint.

There is one transaction, with two kinds of target:

- a checkpoint **directory** (``CheckpointManager.save``, ``safepoint convert``): the
  staging directory ``ROOT/.sp.tmp-<16 hex>`` itself becomes ``ROOT/<name>``;
- a single framework **file** (``.h5``, ``.hdf5``, ``.keras``, ``.weights.h5``,
  ``CheckpointManager.save_file``): the file ``ROOT/.sp.tmp-<16 hex>/checkpoint<suffix>``
  becomes ``ROOT/<name>`` (frameworks check suffixes, so the staged file keeps it).

Call order (the ``_fault`` stage of each step in brackets):

1. :func:`stage` [``stage``]: ``mkdir`` the marked staging entry inside the root (never
   ``$TMPDIR``: a rename across file systems is not atomic; see
   :mod:`safepoint.storage.leftovers`), registered live so no cleanup of this process
   removes it;
2. write: the payload files and the manifest (``manifest.json`` last), each
   ``fsync``-ed [``open``/``write``/``fsync``/``manifest``], or the framework's file,
   then the manifest sealed into it [``write``/``manifest``] -- the caller's part;
3. :func:`commit` makes the staged target durable: a directory loses its marker and is
   ``fsync``-ed [``dir-fsync``], a file is ``fsync``-ed [``fsync``];
4. swap [``rename``]: when ``<name>`` is free, ``rename``; when a committed checkpoint
   has the name (a resumed run saving the same step again), ``renameat2(RENAME_EXCHANGE)``
   swaps the two atomically; where the kernel or file system lacks it, the committed one
   first gets a second name in a marked trash entry ``.trash-sp-<16 hex>`` (a hard link
   for a file, so its name never goes missing; a rename for a directory), then the new
   one is renamed in;
5. ``fsync`` the root [``dir-fsync``], so the rename survives a power loss;
6. the replaced checkpoint (in the staging or trash entry) and the staging entry are
   removed; only then is the save reported.

What each failure leaves on disk:

- an error in steps 1-3: the staging entry is removed (:func:`discard`); the old
  checkpoint, if any, is untouched and nothing new is listed;
- an error in step 4: the swap did not happen, or is undone (the old checkpoint is put
  back under its name); then as above;
- an error in step 5: the rename may not be durable, so it is undone -- the swap
  reversed, or the new checkpoint moved back into staging and the old one back under
  its name -- and the save raises: a save that raised never leaves a checkpoint that
  could vanish on power loss;
- a kill anywhere: the name holds the old checkpoint or the new one, complete, plus at
  worst a marked staging or trash entry. The next writer's lock-time recovery puts a
  checkpoint left in a trash entry back under a missing name, and its cleanup removes
  the entries (``LocalStorage.cleanup_stale``). Nothing committed is ever deleted.

An error at any stage fails the save and is never retried into a commit: after a failed
``fsync`` the kernel may have dropped the dirty pages, so the bytes are gone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Literal

from safepoint.errors import StorageError
from safepoint.ondisk.names import STAGED_FILE_STEM
from safepoint.storage import leftovers, rootlock
from safepoint.storage.files import _exchange, translate

#: ``fault(stage, target)``: the fault-injection hook of the storage (tests fail a stage).
Fault = Callable[[str, str], None]
Kind = Literal["directory", "file"]

#: Inside a file target's staging entry, the file the framework writes: its name is
#: ``FILE_STEM`` plus the final suffix.
FILE_STEM = STAGED_FILE_STEM


def stage(root: str, name: str, fault: Fault) -> str:
    """Create the marked staging entry for checkpoint ``name``; return the entry name."""
    with translate("mkdir", root):
        os.makedirs(root, exist_ok=True)
    with translate("stage", os.path.join(root, name)):
        fault("stage", name)
        return leftovers.make_stage(root, name)


def staged_file(entry: str, suffix: str) -> str:
    """The path (relative to the root) where a file target is written in ``entry``."""
    return f"{entry}/{FILE_STEM}{suffix}"


def commit(root: str, entry: str, name: str, kind: Kind, fault: Fault, *, suffix: str = "") -> None:
    """Steps 3-6: make the staged target durable and swap it in under ``name``.

    ``entry`` is what :func:`stage` returned; ``suffix`` the file target's suffix. The
    staging entry is gone when this returns or raises (the old checkpoint with it, on
    success; the new one, on failure).
    """
    try:
        if kind == "directory":
            src = entry
            with translate("rename", os.path.join(root, entry)):
                leftovers.unmark_stage(root, entry)
            _fsync(root, entry, "dir-fsync", entry, fault)
        else:
            src = staged_file(entry, suffix)
            _fsync(root, src, "fsync", name, fault)
        _swap(root, src, name, fault, root_target="" if kind == "directory" else name)
    finally:
        discard(root, entry)


def discard(root: str, entry: str) -> None:
    """Remove a staging entry and what it holds (idempotent)."""
    leftovers.remove_entry(os.path.join(root, entry))
    rootlock.unmark_live(root, entry)


def fsync_path(path: str) -> None:
    """``fsync`` the file or directory at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(root: str, relpath: str, stage_name: str, target: str, fault: Fault) -> None:
    path = os.path.join(root, relpath) if relpath else root
    with translate(stage_name, path):
        fault(stage_name, target)
        fsync_path(path)


def _swap(root: str, src_rel: str, name: str, fault: Fault, *, root_target: str) -> None:
    """Steps 4-5 with their undo (see the module docstring)."""
    src, dst = os.path.join(root, src_rel), os.path.join(root, name)
    exchanged = False
    trash: str | None = None  # the entry giving the replaced checkpoint a second name
    with translate("rename", dst):
        fault("rename", name)
        if os.path.lexists(dst):
            exchanged = _exchange(root, src_rel, name)
            if not exchanged:
                trash = leftovers.keep_for_replace(root, name)
                try:
                    os.rename(src, dst)  # over a linked file: atomic (POSIX)
                except BaseException:
                    _put_back(root, trash, dst)
                    raise
        else:
            os.rename(src, dst)
    try:
        _fsync(root, "", "dir-fsync", root_target, fault)
    except (StorageError, OSError):
        with contextlib.suppress(OSError):
            if exchanged:
                _exchange(root, src_rel, name)  # the old one back, the new one to staging
            else:
                os.rename(dst, src)  # out of the listing: the caller discards it
                if trash is not None:
                    _put_back(root, trash, dst)
        raise
    if trash is not None:  # the old checkpoint, now out of the listing
        leftovers.remove_entry(os.path.join(root, trash))


def _put_back(root: str, trash: str, dst: str) -> None:
    """Give the checkpoint kept in ``trash`` its name back (if it lost it); drop the entry."""
    if not os.path.lexists(dst):
        os.rename(os.path.join(root, trash, leftovers.ENTRY), dst)
    leftovers.remove_entry(os.path.join(root, trash))


__all__ = ["FILE_STEM", "Fault", "Kind", "commit", "discard", "fsync_path", "stage", "staged_file"]
