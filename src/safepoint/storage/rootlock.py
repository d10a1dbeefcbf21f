"""The writer lock of a root, shared by every writer of this process on that root.

One *process* writes to a root at a time: ``flock`` on the root directory, which the
kernel drops when the process dies, so a crash never leaves a stale lock. Inside the
process, several managers may write to one root (two Keras ``ModelCheckpoint`` s in one
folder, best + last): they share one lock, counted, keyed by the root's
``(st_dev, st_ino)`` whatever path spelled it, and each save's "choose seq, commit,
prune" runs under the root's mutex so two background commits never take one ``seq``.

``fork()`` children inherit the lock's open file description, and with it the lock: a
helper forked by the writer (a data-loader worker) would keep the root locked after
the writer was killed. The children close the inherited descriptors at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading

from safepoint.errors import StorageError
from safepoint.storage.files import translate


class Root:
    """One root held by this process: the flock'ed descriptor and the save mutex."""

    def __init__(self, key: tuple[int, int], fd: int) -> None:
        self.key = key
        self.fd = fd
        self.refs = 0
        self.alive = True
        self.mutex = threading.RLock()
        self.seq = 0  # the largest seq handed out by this process on this root


_ROOTS: dict[tuple[int, int], Root] = {}
#: Reentrant: a manager collected by the garbage collector releases its lock from a
#: finalizer, which may run on a thread that is inside ``acquire`` already.
_GUARD = threading.RLock()
#: Staging entries of saves in flight in this process: (st_dev, st_ino, entry).
_LIVE: set[tuple[int, int, str]] = set()


def acquire(path: str) -> Root:
    """Take (or share) the writer lock of the directory ``path``; ``StorageError`` if
    another process holds it."""
    with translate("lock", path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        with _GUARD:
            held = _ROOTS.get(key)
            if held is None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    raise StorageError(
                        f"Another writer holds the lock on checkpoint root {path!r}. Expected "
                        "one writing process per root (one writing CheckpointManager, or "
                        "several in one process). Received: a second writer. Stop the other "
                        "run, close its manager, or save to another root.",
                        errno=exc.errno,
                        stage="lock",
                    ) from exc
                except OSError as exc:
                    with translate("lock", path):
                        raise exc
                held = _ROOTS[key] = Root(key, fd)
                fd = -1  # owned by the registry now
            held.refs += 1
            return held
    finally:
        if fd >= 0:
            os.close(fd)


def release(root: Root) -> None:
    """Drop one reference; the last one closes the descriptor (and so the flock)."""
    with _GUARD:
        if not root.alive:
            return
        root.refs -= 1
        if root.refs <= 0:
            root.alive = False
            _ROOTS.pop(root.key, None)
            with contextlib.suppress(OSError):
                os.close(root.fd)


def next_seq(root: Root | None, listed: int) -> int:
    """The seq for a new save: above every listed one and every one handed out here."""
    if root is None or not root.alive:
        return listed + 1
    with root.mutex:
        root.seq = max(listed, root.seq) + 1
        return root.seq


def _key(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def mark_live(path: str, entry: str) -> None:
    """``entry`` in root ``path`` is a staging entry of a save in flight in this process."""
    key = _key(path)
    if key is not None:
        with _GUARD:
            _LIVE.add((*key, entry))


def unmark_live(path: str, entry: str) -> None:
    key = _key(path)
    if key is not None:
        with _GUARD:
            _LIVE.discard((*key, entry))


def is_live(path: str, entry: str) -> bool:
    key = _key(path)
    with _GUARD:
        return key is not None and (*key, entry) in _LIVE


def _after_fork_in_child() -> None:
    """A forked child holds no root: close the inherited lock descriptors."""
    global _GUARD
    _GUARD = threading.RLock()  # another thread may have held it at fork time
    for root in _ROOTS.values():
        root.alive = False
        with contextlib.suppress(OSError):
            os.close(root.fd)
    _ROOTS.clear()
    _LIVE.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["Root", "acquire", "is_live", "mark_live", "next_seq", "release", "unmark_live"]
