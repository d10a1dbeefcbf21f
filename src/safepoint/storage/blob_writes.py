"""Writing a dedup save's files together: a small thread pool, and fsyncs deferred.

One ``fsync`` per blob, each waiting for its own journal commit, made a dedup save of
a few hundred tensors 2.6x slower than a plain save of the same bytes (bench/README.md,
"Dedup"). So the new blobs of a save are written by a few threads at once, each left
open without an ``fsync`` (:class:`HeldWriter`), and then fsynced all together, again
in parallel: concurrent ``fsync`` calls share the file system's journal commits. The
descriptors stay open until their ``fsync`` so that a write-back error is reported to
it (an ``fsync`` on a descriptor opened after the error may not see it), at most
:data:`HELD_MAX` at a time.

Nothing changes for crash safety: a blob is renamed to its key only after its
``fsync`` returned, and the checkpoint's manifest is written after every blob it
links is durable (``catalog/dedup.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from safepoint.storage import parallel
from safepoint.storage.protocol import Writer

#: Threads writing one save's files. Two cores keep copying and hashing busy while
#: the others wait on the device; more measured no faster (docs/dedup.md).
WORKERS = 4
#: Blobs written but not yet fsynced (each holds a descriptor) before a save fsyncs
#: them: well under the usual limit of 1024 open files.
HELD_MAX = 256


class HeldWriter:
    """A :class:`Writer` whose ``close`` keeps the file open and unsynced until :meth:`sync`."""

    def __init__(self, inner: Writer) -> None:
        self._inner = inner
        self.direct = bool(getattr(inner, "direct", False))

    def write(self, buffers: Sequence[memoryview]) -> None:
        self._inner.write(buffers)

    def close(self) -> None:
        """Nothing yet: the bytes are made durable by :meth:`sync`."""

    def abort(self) -> None:
        self._inner.abort()

    def sync(self) -> None:
        """``fsync`` and close the file (the inner writer's ``close``)."""
        self._inner.close()


def run_all(tasks: Sequence[Callable[[], object]], workers: int | None = None) -> None:
    """Run ``tasks`` on up to ``workers`` threads (default :data:`WORKERS`).

    Waits for every task before raising the first error (in task order), so that no
    thread still writes into a staging directory the caller then removes. One task
    runs on the calling thread, without a pool.
    """
    parallel.run_all(tasks, WORKERS if workers is None else workers)


def sync_all(writers: Sequence[HeldWriter], workers: int | None = None) -> None:
    """``fsync`` every held writer, in parallel; all are closed when this returns or raises."""

    def sync(writer: HeldWriter) -> Callable[[], None]:
        return writer.sync

    run_all([sync(w) for w in writers], workers)


__all__ = ["HELD_MAX", "WORKERS", "HeldWriter", "run_all", "sync_all"]
