"""``CheckpointManager``: names, orders, saves, restores and prunes a run's checkpoints.

Concurrency contract: one writing process per root at a time (the first ``save()``
takes an exclusive lock on the root and a writer in another process fails with
``StorageError``); several managers of one process may share a root (two callbacks in
one folder: their saves are serialised, and each prunes only its own series); any
number of readers, in any process, at any time. Readers only ever see committed
checkpoints, because a checkpoint becomes visible by a single atomic rename after all
its bytes and its manifest are durable.

Everything the manager knows is derived from the root: the order of checkpoints comes
from the ``seq`` in each manifest, "best" from the metrics in the manifests, so a
restarted process (or a reader on another machine) sees the same run.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from safepoint import formats
from safepoint.catalog.directory import write_checkpoint
from safepoint.catalog.index import Catalog
from safepoint.catalog.series import check_monitor, next_seq
from safepoint.checkpoint import Checkpoint
from safepoint.errors import CheckpointNotFoundError, ConfigError
from safepoint.formats import shards
from safepoint.manager import coordination, options
from safepoint.manager.dedup import REHASH_EVERY, dedup_saving
from safepoint.manager.file_saving import FileSaving
from safepoint.manager.history import History
from safepoint.manager.listing import Listing
from safepoint.manager.options import int_arg, metrics_arg
from safepoint.manager.pruning import Pruner
from safepoint.manager.writer_lock import WriterLock
from safepoint.monitor import resolve_mode
from safepoint.ondisk.manifest import Manifest, now
from safepoint.ondisk.template import NameTemplate, bounded
from safepoint.preemption import DEFAULT_SIGNALS, SaveOnSignal
from safepoint.retention import Keep
from safepoint.state.loading import restore_into
from safepoint.state.tree import TensorLeaf, flatten
from safepoint.storage.local import Storage
from safepoint.storage.staging import Staging
from safepoint.storage.worker import SaveWorker

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("safepoint")


class CheckpointManager(Listing, FileSaving):
    """Save and restore a run's checkpoints under one root, crash-safely.

    ``name`` is a ``str.format`` template over ``step``, ``epoch`` and metrics;
    ``monitor``/``mode`` define "best"; ``keep`` is a :class:`~safepoint.Keep` policy
    (``None`` keeps everything); ``format`` is ``"safetensors"`` or ``"hdf5"``;
    ``run_log=False`` writes no run log into the root (a folder other tools list);
    ``dedup=True`` stores each distinct tensor once per root (docs/dedup.md);
    ``group``: with ``safepoint.distributed`` imported, ``save``/``restore`` are
    collective over this process group (default: the active one when it has more than
    one rank); see ``docs/distributed.md``. ``local_first`` (an ``s3://`` root): commit
    into this local directory, upload in the background (docs/object-storage.md).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Storage,
        *,
        name: str = "step-{step:08d}",
        monitor: str | None = None,
        mode: str = "auto",
        keep: Keep | None = None,
        format: str = "safetensors",
        async_save: bool = False,
        max_staging_bytes: int | None = None,
        shard_bytes: int = formats.SHARD_BYTES,
        storage_options: Mapping[str, Any] | None = None,
        run_log: bool = True,
        dedup: bool = False,
        dedup_rehash_every: int = REHASH_EVERY,
        group: Any = None,
        local_first: str | os.PathLike[str] | None = None,
    ) -> None:
        #: Multi-rank saves and restores (see safepoint.manager.coordination); None: one process.
        self.collective = coordination.find(group)
        self.storage: Storage = options.storage_for(root, storage_options, local_first)
        self.template = NameTemplate(name)
        #: Retention only ever considers checkpoints of this series (recorded in each
        #: manifest); listing, ``latest`` and ``restore`` see the whole root.
        self.series = self.template.template
        self.monitor = monitor
        self._monitor_seen = False
        self.mode = resolve_mode(monitor, mode)
        self.keep = options.keep_policy(keep, monitor)
        self.format = formats.get(format)
        self.async_save = options.flag("async_save", async_save)
        self._staging = Staging(options.staging_bytes(max_staging_bytes))
        self._worker = SaveWorker(str(self.storage.root))
        self.shard_bytes = options.shard_size(shard_bytes)
        self.catalog = Catalog(self.storage)
        self._warned: set[str] = set()
        self._closed = False
        self._lock = WriterLock(self.storage)
        self._history = History(self.storage, self.series, enabled=options.flag("run_log", run_log))
        self._pruner = Pruner(self.catalog, self.template, self._history)
        #: ``dedup=True``: tensors equal to committed ones are hard-linked blobs (docs/dedup.md).
        self._dedup = dedup_saving(self.storage, dedup, dedup_rehash_every, self.format.name)
        if self._dedup is not None and self.collective is not None:
            raise ConfigError(
                "dedup=True is not available for multi-rank saves (each rank writes its own "
                "shards). Expected one process, or dedup=False. Received: dedup=True with a "
                f"process group ({type(self.collective).__name__}). Drop dedup=True."
            )

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.storage.root!r}, name={self.template.template!r})"

    def wait(self) -> None:
        """Block until the async save in flight is committed; re-raise its error if it failed.

        Returns at once when nothing is in flight (always, for synchronous managers).
        """
        self._worker.wait()

    def close(self) -> None:
        """Wait for the save in flight, release the staging memory and the writer lock.

        A background failure is raised here after the lock is released.
        """
        if not self._closed:
            self._closed = True
            try:
                self.wait()
            finally:
                self._history.flush()
                self._staging.release()
                self._lock.close()

    # -- saving ------------------------------------------------------------------------
    def save(
        self,
        state: Any,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """Commit ``state`` as a new checkpoint and apply retention; return it.

        Arguments and the state are validated before any I/O. On any failure nothing
        new is listed and every earlier checkpoint is intact.

        With ``async_save=True`` the call first waits for the previous save to commit
        (raising its error if it failed), copies the state's tensors into the reused
        staging memory, starts writing in the background and returns: the returned
        checkpoint is committed once ``wait()`` returns. Changing the model after the
        call never changes what is saved. A state larger than ``max_staging_bytes`` is
        saved synchronously instead (logged once).
        """
        if self._closed:
            raise ConfigError("This CheckpointManager is closed. Create a new one to save.")
        if self.collective is not None:
            return self.collective.save(self, state, step=step, epoch=epoch, metrics=metrics)
        waited = self._worker.wait()  # at most one save in flight; raises its error
        if waited > 0.001:
            log.info("safepoint: save() waited %.3f s for the previous async save", waited)
        step = bounded("step", int_arg("step", step))
        epoch = bounded("epoch", int_arg("epoch", epoch))
        metrics = metrics_arg(metrics)
        tree, leaves = flatten(state)
        if step is not None:
            self.template.format(step=step, epoch=epoch, metrics=metrics)  # fail before I/O
        self.check_monitor(metrics)
        self._lock.keep()
        seq = self.next_seq()
        step = seq if step is None else step
        name = self.template.format(step=step, epoch=epoch, metrics=metrics)
        created = now()
        if self._dedup is not None:
            self._dedup.snapshot(leaves, tree)  # hints are checked before any copy
        if self.async_save:
            groups = list(shards(leaves, self.shard_bytes))
            prefixes = [self.format.image_prefix(g) for g in groups]
            heads = None if None in prefixes else [p for p in prefixes if p is not None]
            snap = self._staging.capture(groups, heads)
            if snap is not None:
                args = (name, seq, step, epoch, metrics, tree, snap.leaves, created)
                job = functools.partial(self._persist, *args, waited=waited, images=snap.images)
                self._worker.submit(name, job)
                return Checkpoint(
                    name=name,
                    path=os.path.join(self.storage.root, name),
                    step=step,
                    epoch=epoch,
                    metrics=dict(metrics),
                    created=created,
                    seq=seq,
                )
            if "staging" not in self._warned:
                self._warned.add("staging")
                log.warning(
                    "safepoint: the state's tensors need more than max_staging_bytes=%d; "
                    "saving synchronously. Raise max_staging_bytes to save in the background.",
                    self._staging.max_bytes,
                )
        return self._persist(name, seq, step, epoch, metrics, tree, leaves, created)

    def _persist(
        self,
        name: str,
        seq: int,
        step: int,
        epoch: int | None,
        metrics: dict[str, Any],
        tree: Any,
        leaves: list[TensorLeaf],
        created: float,
        *,
        waited: float | None = None,
        images: list[np.ndarray] | None = None,
    ) -> Checkpoint:
        """Write, commit, log and apply retention: the same protocol sync or async."""
        started = time.perf_counter()
        draft = Manifest(
            name=name,
            seq=seq,
            step=step,
            epoch=epoch,
            created=created,
            metrics=metrics,
            tree=tree,
            tensors={},
            files={},
            extra={"series": self.series},
        )
        shard, fmt = self.shard_bytes, self.format
        manifest = (
            self._dedup.write(draft, leaves)
            if self._dedup is not None
            else write_checkpoint(
                self.storage, fmt, draft, leaves, shard_bytes=shard, images=images
            )
        )
        seconds = time.perf_counter() - started
        ckpt = self.catalog.to_checkpoint(manifest, name)
        self.catalog.forget(name)
        self._history.record(
            "save",
            name=name,
            seq=seq,
            step=step,
            epoch=epoch,
            metrics=metrics,
            bytes=manifest.nbytes(),
            seconds=round(seconds, 6),
            **({} if waited is None else {"background": True, "waited": round(waited, 6)}),
        )
        self._apply_retention()
        if self._dedup is not None:
            self._dedup.collect()
        return ckpt

    def release_lock(self) -> None:
        """Let the root's writer lock go between saves (the next save takes it again).

        Waits for the save in flight first. A manager keeps the lock from its first
        :meth:`save` to :meth:`close`; a callback that saves during ``fit`` and cannot
        count on a ``close`` (a fit that dies of an exception gets no callback) releases
        it after each save, so that a retry in the same process can take it.
        """
        try:
            self.wait()
        finally:
            self._lock.release()

    def delete(self, name: str, *, reason: str = "delete") -> None:
        """Delete committed checkpoint ``name`` (crash-safely) and log it with ``reason``.

        Takes the writer lock like :meth:`save` (kept until :meth:`close` or
        :meth:`release_lock`).
        """
        self._lock.keep()
        found = {c.name: c for c in self.checkpoints()}.get(name)
        if found is None:
            raise CheckpointNotFoundError(
                f"No committed checkpoint {name!r} in {self.storage.root}. Expected one of "
                f"the names checkpoints() lists. Received: name={name!r}."
            )
        self._pruner.remove(found, reason)

    def log_skip(
        self,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: dict[str, Any] | None = None,
        reason: str = "",
    ) -> None:
        """Record in the run log that a checkpoint was considered and not saved.

        The first skip of a kind (same reason but for its numbers, same epoch) is written
        at once; the ones that follow are coalesced into one record with a count and the
        first and last step (:class:`~safepoint.storage.runlog.SkipSummary`), written before the
        next save or deletion record, at ``close()``, at exit, or every 10,000 skips or
        60 s: a per-batch save policy would otherwise append a line per skipped batch.
        """
        self._history.skip(step=step, epoch=epoch, metrics=metrics_arg(metrics), reason=reason)

    def next_seq(self) -> int:
        """The seq of a new save: after every committed one, and unique in this process
        even while other managers of the root commit in the background."""
        return next_seq(self.catalog)

    def check_monitor(self, metrics: dict[str, Any]) -> None:
        """Refuse, before any I/O, a save whose metrics lack the monitor when no committed
        checkpoint carries it either (see :func:`safepoint.catalog.series.check_monitor`)."""
        if self.monitor is None or self.keep is None or self._monitor_seen or not metrics:
            return
        check_monitor(self.monitor, metrics, self.checkpoints(), str(self.storage.root))
        self._monitor_seen = True

    def _apply_retention(self) -> None:
        self._pruner.apply(self.keep, monitor=self.monitor, mode=self.mode)

    # -- restoring ---------------------------------------------------------------------
    def restore(
        self,
        state: Any = None,
        *,
        checkpoint: str | int = "latest",
        strict: bool = True,
        missing_ok: bool = False,
    ) -> Checkpoint | None:
        """Load a checkpoint, into ``state`` in place when given; return it with ``.state``.

        ``"latest"`` falls back to the newest checkpoint that verifies, logging each one
        it skips and why. A mismatch between checkpoint and ``state`` is never a reason to
        fall back: it raises ``StateMismatchError`` before anything is loaded.
        """
        if checkpoint == "best" and self.monitor is None:
            raise ConfigError(
                "restore(checkpoint='best') needs a monitor. Received: monitor=None. "
                "Create the manager with monitor='val_loss' (or the metric you track)."
            )
        if self.collective is not None:
            return self.collective.restore(
                self, state, checkpoint=checkpoint, strict=strict, missing_ok=missing_ok
            )
        recover = getattr(self.storage, "recover", None)
        if recover is not None:
            recover()  # a checkpoint a killed re-save left out of the listing comes back
        try:
            ckpt = self.catalog.load(checkpoint, best=self.best)
        except CheckpointNotFoundError:
            if missing_ok:
                return None
            raise
        if state is not None:
            restore_into(state, ckpt.state, strict=strict)
        return ckpt

    def save_on_signal(
        self,
        state: Any,
        *,
        signals: Iterable[int] | None = None,
        grace_period: float | None = None,
        exit_code: int | None = None,
    ) -> SaveOnSignal:
        """On SIGTERM, SIGUSR1 or Ctrl-C, save ``state`` at the next safe point and exit.

        A thin entry point to :class:`safepoint.preemption.SaveOnSignal` (see there):
        the handler only notes the signal; the next ``ModelCheckpoint`` hook (or the
        returned guard's ``check()``) saves synchronously, then exits with 128 + signal.
        """
        return SaveOnSignal(
            self,
            state,
            signals=DEFAULT_SIGNALS if signals is None else signals,
            grace_period=grace_period,
            exit_code=exit_code,
        )


__all__ = ["CheckpointManager"]
