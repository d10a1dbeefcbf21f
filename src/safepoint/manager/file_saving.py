"""Framework files as checkpoints: ``CheckpointManager.save_file`` and ``stage_file``.

Keras (and other frameworks) write their own files; these methods give such a file what
a checkpoint directory has -- safepoint's manifest sealed in, an atomic commit
(:mod:`safepoint.storage.commit`), a ``seq`` in the root's one order, a run-log record
and retention -- so the manager lists, verifies, restores and prunes it. A mixin of
:class:`safepoint.CheckpointManager`, kept apart because it is one concept of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from safepoint.catalog import singlefile
from safepoint.catalog.index import Catalog
from safepoint.checkpoint import Checkpoint
from safepoint.errors import ConfigError
from safepoint.manager.history import History
from safepoint.manager.options import int_arg, metrics_arg
from safepoint.manager.staged_file import StagedFile
from safepoint.manager.writer_lock import WriterLock
from safepoint.storage.protocol import Storage


class FileSaving:
    """The framework-file half of ``CheckpointManager`` (see the module docstring)."""

    storage: Storage
    catalog: Catalog
    series: str
    _closed: bool
    _lock: WriterLock
    _history: History

    def check_monitor(self, metrics: dict[str, Any]) -> None:
        raise NotImplementedError

    def next_seq(self) -> int:
        raise NotImplementedError

    def _apply_retention(self) -> None:
        raise NotImplementedError

    def save_file(
        self,
        name: str,
        write_fn: Callable[[str], None],
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: dict[str, Any] | None = None,
        layout: str = "file",
    ) -> Checkpoint:
        """Commit a single file that a framework writes, as checkpoint ``name``.

        ``write_fn(path)`` must write the file at ``path``, a staging path inside the root
        whose name ends in ``name``'s suffix (``.h5``, ``.hdf5``, ``.keras`` or
        ``.weights.h5``: Keras' ``model.save`` / ``model.save_weights`` check it).
        safepoint then embeds its manifest in the file (an HDF5 attribute, or a zip
        entry), fsyncs it and renames it over ``name`` (the commit transaction of
        :mod:`safepoint.storage.commit`), logs the save and applies retention. The file is
        listed, verified and pruned like a checkpoint directory, and read back by the
        framework as it wrote it. ``layout`` names what the file holds (recorded in its
        manifest). A kill at any moment leaves the previous file or the new one under
        ``name``, complete; on an error nothing new is listed.

        The root's writer lock is taken for this save and released after it, unless a
        :meth:`save` of this manager holds it already. :meth:`stage_file` splits the
        call in two, to commit off the training thread.
        """
        return self.stage_file(
            name, write_fn, step=step, epoch=epoch, metrics=metrics, layout=layout
        ).commit()

    def stage_file(
        self,
        name: str,
        write_fn: Callable[[str], None],
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: dict[str, Any] | None = None,
        layout: str = "file",
    ) -> StagedFile:
        """The first half of :meth:`save_file`: call ``write_fn`` now and return the staged file.

        Its ``commit()`` (from any thread: the hashing, fsyncs and rename can overlap
        training) finishes the save and returns the :class:`Checkpoint`; ``discard()``
        drops it. The writer lock is held until one of them ends it.
        """
        if self._closed:
            raise ConfigError("This CheckpointManager is closed. Create a new one to save.")
        metrics = metrics_arg(metrics)
        draft = singlefile.body(
            name,
            seq=0,
            step=int_arg("step", step),
            epoch=int_arg("epoch", epoch),
            metrics=metrics,
            series=self.series,
        )
        self.check_monitor(metrics)  # before anything is written
        self._lock.enter()
        try:
            entry = singlefile.stage(self.storage, name, write_fn)
        except BaseException:
            self._lock.exit()
            raise
        return StagedFile(
            self.storage,
            entry,
            draft,
            layout,
            next_seq=self.next_seq,
            committed=self._file_committed,
            done=self._lock.exit,
        )

    def _file_committed(self, ckpt: Checkpoint, fields: dict[str, Any]) -> None:
        self.catalog.forget(ckpt.name)
        self._history.record(
            "save",
            name=ckpt.name,
            seq=ckpt.seq,
            step=ckpt.step,
            epoch=ckpt.epoch,
            metrics=ckpt.metrics,
            **fields,
        )
        self._apply_retention()


__all__ = ["FileSaving"]
