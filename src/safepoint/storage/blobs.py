"""The content-addressed blob store of a dedup root: ``ROOT/.sp-blobs/<32 hex>``.

Each blob is one whole payload file (a one-tensor safetensors file) named by the
xxh3-128 of its bytes. A checkpoint that uses a blob holds a **hard link** to it
inside its own directory, so:

- readers see an ordinary checkpoint directory (nothing changes for them, and a copy
  of the directory is self-contained);
- deleting a checkpoint only unlinks its names: bytes another checkpoint references
  keep a link and cannot be freed by any crash, retention or GC;
- the store's own link is only an index. :func:`collect` unlinks blobs that no
  checkpoint (committed or staged) links any more (``st_nlink == 1``), after a grace
  period measured from the inode's last link change (``st_ctime``).

A writer links a blob into its staging directory before the commit; a concurrent
``collect`` that unlinks the store's name at that moment frees nothing the writer
linked (the link keeps the inode), and a writer whose ``link`` finds the name gone
writes the bytes again. Only this module calls ``os`` on the store.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time

from safepoint.ondisk.names import BLOB_KEY_RE, BLOBS
from safepoint.storage.commit import fsync_path
from safepoint.storage.files import translate

#: Seconds an unreferenced blob is kept, measured from its last link change: a
#: ``safepoint gc`` from another process then never races a save that just found it.
GRACE_S = 3600.0
_CHUNK = 8 << 20


def blob_relpath(key: str) -> str:
    """The store path (relative to the root) of blob ``key``."""
    return f"{BLOBS}/{key}"


def temp_relpath() -> str:
    """A fresh temporary name inside the store for a blob being written."""
    return f"{BLOBS}/.tmp-{secrets.token_hex(8)}"


def ensure(root: str) -> None:
    """Create the store folder (and make its entry in the root durable)."""
    path = os.path.join(root, BLOBS)
    if os.path.isdir(path):
        return
    with translate("mkdir", path):
        os.makedirs(path, exist_ok=True)
        fsync_path(root)


def has(root: str, key: str) -> bool:
    """True when the store holds blob ``key`` as a regular file."""
    try:
        return stat.S_ISREG(os.lstat(os.path.join(root, blob_relpath(key))).st_mode)
    except FileNotFoundError:
        return False


def same_bytes(root: str, key: str, parts: list[memoryview]) -> bool:
    """True when blob ``key`` holds exactly the bytes of ``parts`` (compared byte by
    byte: the key is a fast hash, so an equal key alone never substitutes content)."""
    try:
        fd = os.open(os.path.join(root, blob_relpath(key)), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_size != sum(p.nbytes for p in parts):
            return False
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            for part in parts:
                flat = part.cast("B")
                for start in range(0, flat.nbytes, _CHUNK):
                    want = flat[start : start + _CHUNK]
                    if f.read(want.nbytes) != want:
                        return False
        return True
    finally:
        os.close(fd)


def publish(root: str, temp: str, key: str) -> None:
    """Give the written, fsynced blob at ``temp`` its content name (atomic rename).

    A blob of the same key written meanwhile has the same bytes: either one wins. The
    rename is made durable by :func:`sync_store`, once per save: a store name lost to a
    power cut costs sharing (the next save writes the blob again), never content (the
    checkpoint's own link, made durable by its commit, keeps the inode).
    """
    src, dst = os.path.join(root, temp), os.path.join(root, blob_relpath(key))
    with translate("rename", dst):
        os.rename(src, dst)


def sync_store(root: str) -> None:
    """Make the store's entries (the renames of :func:`publish`) durable."""
    path = os.path.join(root, BLOBS)
    with translate("dir-fsync", path):
        fsync_path(path)


def link(root: str, key: str, dst_rel: str) -> bool:
    """Hard-link blob ``key`` to ``dst_rel``; False when the store no longer has it."""
    src, dst = os.path.join(root, blob_relpath(key)), os.path.join(root, dst_rel)
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(dst)):
            raise
        return False
    return True


def discard(root: str, relpath: str) -> None:
    """Remove a temporary blob that was not published (idempotent)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(root, relpath))


def collect(root: str, *, grace_s: float = GRACE_S, dry_run: bool = False) -> tuple[int, int]:
    """Unlink blobs no checkpoint links any more; return ``(count, bytes)`` freed.

    Also removes temporary blobs older than the grace period (a save killed while
    writing one). Anything that is not a regular file is left alone.
    """
    folder = os.path.join(root, BLOBS)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0, 0
    cutoff = time.time() - grace_s
    count = freed = 0
    for entry in sorted(names):
        if not (BLOB_KEY_RE.match(entry) or entry.startswith(".tmp-")):
            continue
        path = os.path.join(folder, entry)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_ctime > cutoff:
            continue
        if not dry_run:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        count, freed = count + 1, freed + st.st_size
    if count and not dry_run:
        fsync_path(folder)
    return count, freed


def inode(root: str, relpath: str) -> tuple[int, int, int]:
    """``(device, inode, size)`` of the file at ``relpath`` (never following links)."""
    st = os.lstat(os.path.join(root, relpath))
    return st.st_dev, st.st_ino, st.st_size


__all__ = [
    "GRACE_S",
    "blob_relpath",
    "collect",
    "discard",
    "ensure",
    "has",
    "inode",
    "link",
    "publish",
    "same_bytes",
    "temp_relpath",
]
