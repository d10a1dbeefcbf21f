"""A manager's hold on its root's writer lock: who needs it, and when it goes.

The root's writer lock (``Storage.lock``: one writing process per root) is taken by the
first save. ``CheckpointManager.save`` keeps it until ``close`` (or ``release_lock``);
a framework file (``save_file``/``stage_file``) holds it from its write to its commit
only, so a Keras callback that never sees the end of a failed ``fit`` leaves the root
free for a retry in the same process. Several files may be in flight at once (one
committing in the background while the next is written): the lock goes when the last
of them ends and no ``save`` keeps it.

The first time the lock is taken, what interrupted writers left in the root is
recovered and cleaned up (``Storage.cleanup_stale``).
"""

from __future__ import annotations

import logging
import threading

from safepoint.storage.protocol import Storage

log = logging.getLogger("safepoint")


class WriterLock:
    """Counts the users of one storage's writer lock (see the module docstring)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._mutex = threading.Lock()
        self._kept = False
        self._users = 0
        self._cleaned = False

    def _take(self) -> None:
        self._storage.lock()
        if not self._cleaned:
            for stale in self._storage.cleanup_stale():
                log.info("safepoint: removed %s left by an interrupted writer", stale)
            self._cleaned = True

    def keep(self) -> None:
        """Take the lock and keep it until :meth:`release` or :meth:`close`."""
        with self._mutex:
            self._take()
            self._kept = True

    def enter(self) -> None:
        """Take the lock for one save; :meth:`exit` ends it."""
        with self._mutex:
            self._take()
            self._users += 1

    def exit(self) -> None:
        with self._mutex:
            self._users = max(0, self._users - 1)
            # A storage that asks to (local-first: releasing waits for its uploads)
            # keeps the lock until close().
            self._kept = self._kept or bool(getattr(self._storage, "keep_lock", False))
            if self._users == 0 and not self._kept:
                self._storage.unlock()

    def release(self) -> None:
        """Drop what :meth:`keep` took; the lock goes once no save uses it."""
        with self._mutex:
            self._kept = False
            if self._users == 0:
                self._storage.unlock()

    def close(self) -> None:
        """Let the lock go, whatever holds it (the manager is closing)."""
        with self._mutex:
            self._kept = False
            self._users = 0
            self._storage.unlock()


__all__ = ["WriterLock"]
