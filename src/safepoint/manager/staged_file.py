"""A framework file written and waiting for its commit: the two halves of ``save_file``.

Keras writes its own files (``model.save``, ``model.save_weights``); safepoint commits
them. Writing must happen on the training thread (it reads the live model), while the
commit (hashing, sealing the manifest in, fsyncs, the rename) can overlap the next
training steps. :meth:`CheckpointManager.stage_file` does the first half and returns a
:class:`StagedFile`; its :meth:`~StagedFile.commit` (any thread) does the second, or
:meth:`~StagedFile.discard` drops it. ``CheckpointManager.save_file`` is both at once.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from safepoint.catalog import singlefile
from safepoint.checkpoint import Checkpoint
from safepoint.ondisk.embedded import KEY
from safepoint.ondisk.manifest import Manifest
from safepoint.storage.protocol import Storage


class StagedFile:
    """A checkpoint file written into a staging entry of the root, not listed yet.

    Built by :meth:`safepoint.CheckpointManager.stage_file`, which holds the root's
    writer lock for it; :meth:`commit` or :meth:`discard` (exactly one, once) ends it.
    """

    def __init__(
        self,
        storage: Storage,
        entry: str,
        draft: Manifest,
        layout: str,
        *,
        next_seq: Callable[[], int],
        committed: Callable[[Checkpoint, dict[str, Any]], None],
        done: Callable[[], None],
    ) -> None:
        self.name = draft.name
        self._storage = storage
        self._entry: str | None = entry
        self._draft = draft
        self._layout = layout
        self._next_seq = next_seq
        self._committed = committed
        self._done = done
        self._started = time.perf_counter()
        self._ended = threading.Lock()
        # Dropped without commit() or discard() (an exception between the two halves):
        # the staged file (a model-sized temporary, for a bucket) goes with the object.
        self._drop = weakref.finalize(self, _discard_quietly, storage, entry)

    def _end(self) -> str | None:
        with self._ended:
            entry, self._entry = self._entry, None
        if entry is not None:
            self._drop.detach()  # commit() or discard() owns the entry now
        return entry

    def commit(self) -> Checkpoint:
        """Seal, fsync and rename the file in; log the save and apply retention.

        The ``seq`` is taken here, under the root's save mutex, so files and checkpoint
        directories saved meanwhile by other managers of the root keep one order. On any
        failure nothing new is listed and the file it replaces, if any, is intact.
        """
        entry = self._end()
        if entry is None:
            raise RuntimeError(f"StagedFile {self.name!r} was already committed or discarded.")
        storage = self._storage
        try:
            serial = getattr(storage, "serial", None)
            with serial() if serial is not None else _Null():
                try:
                    seq = self._next_seq()
                except BaseException:
                    singlefile.discard(storage, entry)
                    raise
                found = singlefile.finish(
                    storage, entry, replace(self._draft, seq=seq), self._layout
                )
                ckpt = Checkpoint(
                    name=self.name,
                    path=os.path.join(str(storage.root), self.name),
                    step=found.step,
                    epoch=found.epoch,
                    metrics=dict(found.metrics),
                    created=found.created,
                    seq=seq,
                )
                self._committed(
                    ckpt,
                    {
                        "bytes": int(found.extra[KEY].get("size", 0)),
                        "seconds": round(time.perf_counter() - self._started, 6),
                    },
                )
        finally:
            self._done()
        return ckpt

    def discard(self) -> None:
        """Drop the staged file (nothing is committed); a no-op once ended."""
        entry = self._end()
        if entry is None:
            return
        try:
            singlefile.discard(self._storage, entry)
        finally:
            self._done()


def _discard_quietly(storage: Storage, entry: str) -> None:
    with contextlib.suppress(Exception):  # a leftover is cleanup's, never an error here
        singlefile.discard(storage, entry)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


__all__ = ["StagedFile"]
