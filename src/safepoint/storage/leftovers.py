"""Staging and trash entries: how safepoint marks them, recovers them and cleans them up.

Every temporary entry safepoint creates in a root is a hidden directory with a
fixed-length name (``.sp.tmp-<16 hex>`` to stage, ``.trash-sp-<16 hex>`` for a
checkpoint on its way out) holding a marker file, written first, that records what it
is and which checkpoint name it stands for. Cleanup removes only entries that are
recognisably safepoint's: that name pattern plus the marker, or (for entries older
versions left, ``<name>.tmp-<hex>`` and ``.trash-<name>-<hex>``) contents made only of
safepoint's own files. Anything else (a user's ``results.tmp-old``) is left and logged.

A same-name re-save on a file system without an atomic swap moves the committed
checkpoint into a trash entry, then the new one in under the name; a kill between
the two leaves the name missing. Recovery, run by the lock holder before cleanup,
puts the committed checkpoint back: nothing committed is ever deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import stat
from typing import Any

from safepoint.ondisk.names import (
    MANIFEST_NAME,
    MARKER,
    OLD_STAGE_RE,
    OLD_STAGED_FILE_RE,
    OLD_TRASH_RE,
    PAYLOAD_RE,
    STAGE_PREFIX,
    STAGE_RE,
    TRASH_ENTRY,
    TRASH_RE,
    TRASH_SP_PREFIX,
    component_problem,
)
from safepoint.storage import rootlock
from safepoint.storage.files import _write_all

log = logging.getLogger("safepoint")

#: Inside a trash entry, the checkpoint (directory or file) it holds.
ENTRY = TRASH_ENTRY
_MARKER_MAX = 64 << 10


def _write_marker(path: str, fields: dict[str, Any], *, durable: bool) -> None:
    data = json.dumps({"safepoint": 1, **fields}).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, [memoryview(data)])
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_marker(path: str) -> dict[str, Any] | None:
    """The marker of the entry at ``path``, or None when it has none (or a foreign one)."""
    try:
        fd = os.open(
            os.path.join(path, MARKER),
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        )
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MARKER_MAX:
            return None
        found = json.loads(os.read(fd, _MARKER_MAX))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(found, dict) or found.get("safepoint") != 1:
        return None
    return found


def make_stage(root: str, name: str) -> str:
    """Create a marked staging directory for checkpoint ``name``; return its entry name."""
    entry = f"{STAGE_PREFIX}{secrets.token_hex(8)}"
    path = os.path.join(root, entry)
    # Live before it exists: another manager of this process cleaning the root must
    # never see the entry before its marker is written, and remove it mid-stage.
    rootlock.mark_live(root, entry)
    try:
        os.mkdir(path, 0o755)
        _write_marker(
            os.path.join(path, MARKER),
            {"kind": "stage", "name": name, "pid": os.getpid()},
            durable=False,
        )
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        rootlock.unmark_live(root, entry)
        raise
    return entry


def unmark_stage(root: str, entry: str) -> None:
    """Remove the marker of a staging directory about to become a checkpoint."""
    os.unlink(os.path.join(root, entry, MARKER))


def make_trash(root: str, name: str, *, op: str) -> str:
    """Create a marked trash directory for checkpoint ``name``; return its entry name.

    ``op`` is ``"replace"`` (a same-name re-save: recovery puts the entry back if the
    name is missing) or ``"remove"`` (retention: the entry is deleted). The marker is
    durable before anything is moved in, so a power loss never leaves a committed
    checkpoint in an entry cleanup cannot recognise.
    """
    entry = f"{TRASH_SP_PREFIX}{secrets.token_hex(8)}"
    path = os.path.join(root, entry)
    os.mkdir(path, 0o755)
    try:
        _write_marker(os.path.join(path, MARKER), {"kind": op, "name": name}, durable=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return entry


def keep_for_replace(root: str, name: str) -> str:
    """Give the committed file ``name`` a second name in a marked trash entry.

    A hard link keeps the name in place, so the rename of the new file over it is
    atomic. On a file system without hard links (some FUSE, SMB, vfat mounts) the file
    is moved instead; a kill before the new file is renamed in then leaves the name
    missing, and the next writer's recovery puts the old file back.
    """
    trash = make_trash(root, name, op="replace")
    kept = os.path.join(root, trash, ENTRY)
    try:
        os.link(os.path.join(root, name), kept, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS):
            shutil.rmtree(os.path.join(root, trash), ignore_errors=True)
            raise
        os.rename(os.path.join(root, name), kept)
    return trash


def put_back_file(root: str, trash: str, final: str) -> None:
    """Put the file kept in ``trash`` back under ``final`` and drop the trash entry."""
    os.replace(os.path.join(root, trash, ENTRY), final)
    remove_entry(os.path.join(root, trash))


def remove_entry(path: str) -> bool:
    """Remove a staging or trash directory, its marker last; True when it is gone.

    Cut short (an I/O error, a kill), what remains still carries the marker, so the
    next cleanup recognises it and finishes the job.
    """
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        names = []
    for name in names:
        if name == MARKER:
            continue
        inner = os.path.join(path, name)
        info = _lstat(inner)
        if info is not None and stat.S_ISDIR(info.st_mode):
            shutil.rmtree(inner, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(inner)
    shutil.rmtree(path, ignore_errors=True)
    return _lstat(path) is None


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _only_ours(path: str) -> bool:
    """True when directory ``path`` holds nothing but safepoint's own files."""
    try:
        with os.scandir(path) as it:
            for n, item in enumerate(it):
                if n > 100_000 or not item.is_file(follow_symlinks=False):
                    return False
                if item.name not in (MANIFEST_NAME, MARKER) and not PAYLOAD_RE.match(item.name):
                    return False
    except OSError:
        return False
    return True


def _has_manifest(path: str) -> bool:
    info = _lstat(os.path.join(path, MANIFEST_NAME))
    return info is not None and stat.S_ISREG(info.st_mode) and info.st_size > 2


def _is_ours_single(path: str) -> bool:
    """A regular file that starts like the files safepoint stages (HDF5, zip) or is empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.pread(fd, 8, 0)
    finally:
        os.close(fd)
    return head in (b"", b"\x89HDF\r\n\x1a\n") or head.startswith(b"PK\x03\x04")


def _put_back(root: str, src: str, name: str) -> bool:
    """Move ``src`` back under ``name`` if the name is free; True when done."""
    if component_problem(name) is not None or _lstat(os.path.join(root, name)) is not None:
        return False
    os.rename(src, os.path.join(root, name))
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning(
        "safepoint: restored %s from %s: a writer was interrupted while replacing it",
        name,
        os.path.basename(src),
    )
    return True


def _leave(entry: str, why: str) -> None:
    log.warning(
        "safepoint: leaving %s in place: %s; delete it yourself if it is not needed", entry, why
    )


def _replaced(root: str, entry: str) -> tuple[str, str] | None:
    """(inner path, name) of a trash entry holding a checkpoint whose name is missing."""
    if not TRASH_RE.match(entry):
        return None
    path = os.path.join(root, entry)
    info = _lstat(path)
    if info is None or not stat.S_ISDIR(info.st_mode):
        return None
    marker = read_marker(path)
    if marker is None or marker.get("kind") != "replace":
        return None
    name, inner = str(marker.get("name")), os.path.join(path, ENTRY)
    if component_problem(name) is not None or _lstat(inner) is None:
        return None
    if _lstat(os.path.join(root, name)) is not None:
        return None
    return inner, name


def pending(root: str, names: list[str]) -> bool:
    """True when a replaced checkpoint waits in a trash entry for its missing name."""
    return any(_replaced(root, n) is not None for n in names)


def recover(root: str, names: list[str]) -> list[str]:
    """Put back every committed checkpoint a cut-short re-save left in a trash entry.

    Deletes nothing (cleanup does, later). Returns the names restored.
    """
    restored = []
    for entry in names:
        found = _replaced(root, entry)
        if found is not None:
            try:
                if _put_back(root, *found):
                    restored.append(found[1])
            except OSError as exc:
                log.warning("safepoint: could not restore %s from %s: %s", found[1], entry, exc)
    return restored


def clean(root: str, names: list[str]) -> list[str]:
    """Recover and remove the leftovers of interrupted writers (lock holders only).

    Returns the entries removed. Trash entries come first: a checkpoint whose
    replacement was cut short goes back under its name before staging entries go.
    """
    removed: list[str] = []
    trash = [n for n in names if TRASH_RE.match(n) or OLD_TRASH_RE.match(n)]
    rest = [n for n in names if n not in trash]
    for entry in trash + rest:
        path = os.path.join(root, entry)
        info = _lstat(path)
        if info is None:
            continue
        try:
            if _clean_one(root, entry, path, info):
                removed.append(entry)
        except OSError as exc:
            log.warning("safepoint: could not clean up %s: %s", entry, exc)
    return removed


def _clean_one(root: str, entry: str, path: str, info: os.stat_result) -> bool:
    is_dir = stat.S_ISDIR(info.st_mode)
    if TRASH_RE.match(entry) and is_dir:
        marker = read_marker(path)
        if marker is None:
            if set(os.listdir(path)) <= {MARKER}:  # cut short while its marker was written
                return remove_entry(path)
            _leave(entry, "a trash-like directory without safepoint's marker")
            return False
        inner = os.path.join(path, ENTRY)
        if marker.get("kind") == "replace" and _lstat(inner) is not None:
            _put_back(root, inner, str(marker.get("name")))
        return remove_entry(path)
    if STAGE_RE.match(entry) and is_dir:
        if rootlock.is_live(root, entry):
            return False  # a save of this process is writing it
        if read_marker(path) is None and not _only_ours(path):
            _leave(entry, "a staging-like directory holding files safepoint does not write")
            return False
        return remove_entry(path)
    if OLD_STAGED_FILE_RE.match(entry):
        # Staged by a killed writer of an earlier version, maybe half written (so no
        # content to recognise): a hidden name with a random part only safepoint made.
        if stat.S_ISREG(info.st_mode):
            os.unlink(path)
            return True
        _leave(entry, "not a file safepoint staged")
        return False
    old_trash = OLD_TRASH_RE.match(entry)
    if old_trash:
        return _clean_old_trash(root, entry, path, info, old_trash.group("name"))
    if OLD_STAGE_RE.match(entry) and is_dir:
        if _only_ours(path):
            shutil.rmtree(path)
            return True
        _leave(entry, "a directory named like a staging one that holds other files")
    return False


def _clean_old_trash(root: str, entry: str, path: str, info: os.stat_result, name: str) -> bool:
    """``.trash-<name>-<hex>`` of earlier versions: a directory or a single file."""
    if stat.S_ISDIR(info.st_mode):
        if not _only_ours(path):
            _leave(entry, "a trash-like directory holding files safepoint does not write")
            return False
        if _has_manifest(path) and _put_back(root, path, name):
            return False  # it is a checkpoint again, not a removed leftover
        shutil.rmtree(path)
        return True
    if stat.S_ISREG(info.st_mode) and _is_ours_single(path) and os.path.getsize(path):
        if _put_back(root, path, name):
            return False
        os.unlink(path)
        return True
    _leave(entry, "not a checkpoint safepoint moved aside")
    return False


__all__ = [
    "ENTRY",
    "clean",
    "keep_for_replace",
    "make_stage",
    "make_trash",
    "pending",
    "put_back_file",
    "read_marker",
    "recover",
    "remove_entry",
    "unmark_stage",
]
