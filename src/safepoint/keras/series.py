"""The backups of one ``BackupAndRestore``: its own, and nothing else in the folder.

A backup folder is often shared: ``ModelCheckpoint(d + "/best.keras")`` next to
``BackupAndRestore(d)`` is a common layout, and a user may keep notes or a plain
``CheckpointManager`` run there. The manager lists every committed checkpoint in the
root, so the backup side must pick its own out of that listing before it restores
from one, prunes or deletes one: a ``best.keras`` taken for a backup cannot be resumed
from (it holds no training state), and one pruned or deleted as a backup is the
user's best model gone.

A backup is recognised by its name (``backup-`` and ten digits, a name no
``ModelCheckpoint`` can produce: those need a file suffix) and by what its manifest
says it holds: a checkpoint directory (not a single file) whose state has the keys
this callback saves.
"""

from __future__ import annotations

import logging
import re

from safepoint.catalog.index import UNREADABLE
from safepoint.checkpoint import Checkpoint
from safepoint.errors import CheckpointNotFoundError, CorruptCheckpointError, SafepointError
from safepoint.manager import CheckpointManager
from safepoint.ondisk.container import container_of
from safepoint.ondisk.manifest import NAME as MANIFEST

log = logging.getLogger("safepoint")

#: The manager's name template for backups, and the names it produces.
NAME = "backup-{step:010d}"
PATTERN = re.compile(r"backup-[0-9]{10,}")  # {step:010d}: ten digits, or more
#: The top-level keys of every backup's state (see ``BackupAndRestore._save``).
KEYS = frozenset({"model", "optimizer", "keras_seed", "rng", "progress"})
#: Backups kept: the newest, and the one before it in case the newest is damaged.
KEEP = 2


def _holds_a_backup(manager: CheckpointManager, name: str) -> bool:
    """True when ``name``'s manifest describes a backup's state (read from the cache)."""
    try:
        found = manager.catalog.manifest(name)
    except (OSError, SafepointError):
        return False
    tree = found.tree
    return container_of(found) == "directory" and isinstance(tree, dict) and set(tree) >= KEYS


def own(manager: CheckpointManager) -> list[Checkpoint]:
    """This callback's committed backups in ``manager``'s root, oldest first."""
    return _own(manager, manager.checkpoints())


def _own(manager: CheckpointManager, listed: list[Checkpoint]) -> list[Checkpoint]:
    return [c for c in listed if PATTERN.fullmatch(c.name) and _holds_a_backup(manager, c.name)]


def _unlisted(manager: CheckpointManager, listed: set[str]) -> list[str]:
    """Backup-named directories with a manifest that does not parse (damaged, or newer).

    They are tried last, so that a folder whose only backups are damaged is reported
    instead of being taken for a fresh start.
    """
    out = []
    for name in manager.catalog.entries():
        if name in listed or not PATTERN.fullmatch(name):
            continue
        try:
            if manager.storage.exists(f"{name}/{MANIFEST}"):
                out.append(name)
        except (OSError, SafepointError):
            out.append(name)  # there, but refused (a link): report it
    return out


def restore(manager: CheckpointManager) -> tuple[Checkpoint | None, list[str]]:
    """``(the newest backup that loads, the newer ones skipped as damaged)``.

    ``(None, [])`` when there is no backup. A damaged backup is skipped (logged) in
    favour of the one before it; one deleted since the listing is simply gone (not
    called damaged); when every backup is damaged, ``CorruptCheckpointError`` says so.
    """
    everything = manager.checkpoints()
    names = [c.name for c in reversed(_own(manager, everything))]
    errors: list[str] = []
    for name in names + _unlisted(manager, {c.name for c in everything}):
        try:
            ckpt = manager.restore(checkpoint=name)
        except CheckpointNotFoundError:
            continue  # deleted since it was listed
        except UNREADABLE as exc:
            log.warning("safepoint: skipping backup %s: %s", name, exc)
            errors.append(f"{name}: {exc}")
            continue
        if ckpt is not None and isinstance(ckpt.state, dict) and set(ckpt.state) >= KEYS:
            return ckpt, [e.partition(":")[0] for e in errors]
        errors.append(f"{name}: not a BackupAndRestore backup")
    if errors:
        raise CorruptCheckpointError(
            f"No backup in {manager.storage.root} can be resumed from; tried {len(errors)}: "
            + " | ".join(errors)
            + ". Expected a backup written by safepoint.keras.BackupAndRestore. Move those "
            "backup-* directories out of the folder to start over (keep them for inspection)."
        )
    return None, []


def _remove(manager: CheckpointManager, ckpt: Checkpoint, reason: str) -> None:
    manager.delete(ckpt.name, reason=reason)


def prune(manager: CheckpointManager) -> None:
    """Delete all but the ``KEEP`` newest backups."""
    for ckpt in own(manager)[:-KEEP]:
        _remove(manager, ckpt, "retention")


def delete_all(manager: CheckpointManager) -> None:
    """Delete every backup of this callback."""
    for ckpt in own(manager):
        _remove(manager, ckpt, "delete_checkpoint")


__all__ = ["KEEP", "KEYS", "NAME", "PATTERN", "delete_all", "own", "prune", "restore"]
