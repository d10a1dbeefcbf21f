"""``CheckpointManager``: names, orders, saves, restores and prunes a run's checkpoints.

Concurrency contract: one writing manager per root at a time (the first ``save()``
takes an exclusive lock on the root and a second writer fails with ``StorageError``);
any number of readers, in any process, at any time. Readers only ever see committed
checkpoints, because a checkpoint becomes visible by a single atomic rename after all
its bytes and its manifest are durable.

Everything the manager knows is derived from the root: the order of checkpoints comes
from the ``seq`` in each manifest, "best" from the metrics in the manifests, so a
restarted process (or a reader on another machine) sees the same run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import formats, reader, runlog, singlefile
from .checkpoint import Checkpoint, Verification
from .errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    IncompleteCheckpointError,
    SafepointError,
    StorageError,
)
from .manifest import NAME as MANIFEST_NAME
from .manifest import Manifest, now
from .monitor import metric_value, resolve_mode
from .retention import Keep, rank_best
from .snapshot import Staging, default_cap
from .storage import LOG_NAME, TMP_MARK, TRASH_PREFIX, LocalStorage, Storage
from .target import restore_into
from .template import NameTemplate
from .tree import TensorLeaf, flatten
from .worker import SaveWorker

if TYPE_CHECKING:
    from .preemption import SaveOnSignal

log = logging.getLogger("safepoint")

_UNREADABLE = (CorruptCheckpointError, IncompatibleCheckpointError, IncompleteCheckpointError)


def _int_arg(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if hasattr(value, "__index__") and not isinstance(value, bool):
        value = int(value.__index__())
        if value >= 0:
            return value
    raise ConfigError(
        f"Invalid {name}. Expected a non-negative int or None. Received: {name}={value!r}."
    )


def _metrics_arg(metrics: Any) -> dict[str, Any]:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise ConfigError(f"metrics must be a dict of name -> number. Received: {metrics!r}.")
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise ConfigError(f"Metric names must be str. Received: {k!r}.")
        if v is None or isinstance(v, bool | int | float | str):
            out[k] = v
            continue
        try:
            out[k] = float(v)  # numpy scalars, 0-d tensors
        except (TypeError, ValueError):
            raise ConfigError(
                f"Metric {k!r} must be a number. Received: {type(v).__name__} {v!r}."
            ) from None
    return out


class CheckpointManager:
    """Save and restore a run's checkpoints under one root, crash-safely.

    ``name`` is a ``str.format`` template over ``step``, ``epoch`` and metrics;
    ``monitor``/``mode`` define "best"; ``keep`` is a :class:`~safepoint.Keep` policy
    (``None`` keeps everything); ``format`` is ``"safetensors"`` or ``"hdf5"``.
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
    ) -> None:
        if isinstance(root, str | os.PathLike):
            text = os.fspath(root)
            if "://" in str(text):
                raise ConfigError(
                    f"URL roots need an object-store backend, which this version does not "
                    f"include yet. Expected a local path. Received: root={text!r}. Use a local "
                    "or network-mounted directory."
                )
            self.storage: Storage = LocalStorage(text)
        elif hasattr(root, "list_names"):
            self.storage = root
        else:
            raise ConfigError(f"root must be a path or a Storage. Received: root={root!r}.")
        self.template = NameTemplate(name)
        self.monitor = monitor
        self.mode = resolve_mode(monitor, mode)
        if keep is not None and not isinstance(keep, Keep):
            raise ConfigError(f"keep must be a safepoint.Keep or None. Received: keep={keep!r}.")
        if keep is not None and keep.best and monitor is None:
            raise ConfigError(
                f"keep={keep!r} keeps the best checkpoints but no monitor was given. Pass "
                "monitor='val_loss' (or another metric), or drop best= from Keep."
            )
        self.keep = keep
        self.format = formats.get(format)
        if not isinstance(async_save, bool):
            raise ConfigError(f"async_save must be True or False. Received: {async_save!r}.")
        self.async_save = async_save
        if max_staging_bytes is None:
            max_staging_bytes = default_cap()
        if (
            isinstance(max_staging_bytes, bool)
            or not isinstance(max_staging_bytes, int)
            or max_staging_bytes < 0
        ):
            raise ConfigError(
                "max_staging_bytes must be a non-negative int or None (half the physical "
                f"memory). Received: max_staging_bytes={max_staging_bytes!r}."
            )
        self._staging = Staging(max_staging_bytes)
        self._worker = SaveWorker(str(self.storage.root))
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ConfigError(f"shard_bytes must be a positive int. Received: {shard_bytes!r}.")
        self.shard_bytes = shard_bytes
        self._cache: dict[str, tuple[bytes, Manifest]] = {}
        self._warned: set[str] = set()
        self._closed = False
        self._cleaned = False

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
                self._staging.release()
                self.storage.unlock()

    # -- listing -----------------------------------------------------------------------
    def _manifest(self, name: str) -> Manifest:
        relpath = f"{name}/{MANIFEST_NAME}"
        from .manifest import MAX_BYTES

        if singlefile.is_single_file(self.storage, name):
            relpath = name
            data = singlefile.manifest_bytes(self.storage, name)
        else:
            data = self.storage.read_bytes(relpath, max_size=MAX_BYTES)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == data:
            return cached[1]
        from .manifest import parse

        found = parse(data, where=relpath)
        self._cache[name] = (data, found)
        return found

    def _entries(self) -> list[str]:
        return [
            n
            for n in self.storage.list_names()
            if n != LOG_NAME
            and TMP_MARK not in n
            and not n.startswith((TRASH_PREFIX, "."))
            and (self.storage.is_dir(n) or singlefile.is_single_file(self.storage, n))
        ]

    def _to_checkpoint(self, found: Manifest) -> Checkpoint:
        return Checkpoint(
            name=found.name if found.name else "",
            path=os.path.join(self.storage.root, found.name),
            step=found.step,
            epoch=found.epoch,
            metrics=dict(found.metrics),
            created=found.created,
            seq=found.seq,
        )

    def checkpoints(self) -> list[Checkpoint]:
        """Committed checkpoints, oldest first (by the manifest's ``seq``)."""
        out = []
        for name in self._entries():
            try:
                found = self._manifest(name)
            except FileNotFoundError:
                continue  # no manifest: never committed
            except StorageError:
                # The disk failed to read it (EIO...): it may well be committed, so a
                # listing without it is wrong. A save would take a seq that is not the
                # largest, and restore('latest') would quietly resume an older one.
                raise
            except _UNREADABLE as exc:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("safepoint: not listing %s: %s", name, exc)
                continue
            ckpt = self._to_checkpoint(found)
            out.append(replace(ckpt, name=name, path=os.path.join(self.storage.root, name)))
        out.sort(key=lambda c: (c.seq, c.name))
        return out

    def latest(self) -> Checkpoint | None:
        """The newest committed checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def best(self) -> Checkpoint | None:
        """The committed checkpoint with the best monitored metric, or None."""
        ranked = rank_best(self.checkpoints(), monitor=self.monitor, mode=self.mode)
        return ranked[0] if ranked else None

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
        waited = self._worker.wait()  # at most one save in flight; raises its error
        if waited > 0.001:
            log.info("safepoint: save() waited %.3f s for the previous async save", waited)
        step = _int_arg("step", step)
        epoch = _int_arg("epoch", epoch)
        metrics = _metrics_arg(metrics)
        tree, leaves = flatten(state)
        if step is not None:
            self.template.format(step=step, epoch=epoch, metrics=metrics)  # fail before I/O
        self.storage.lock()
        if not self._cleaned:
            for stale in self.storage.cleanup_stale():
                log.info("safepoint: removed %s left by an interrupted writer", stale)
            self._cleaned = True
        existing = self.checkpoints()
        seq = max((c.seq for c in existing), default=0) + 1
        step = seq if step is None else step
        name = self.template.format(step=step, epoch=epoch, metrics=metrics)
        created = now()
        if self.async_save:
            snap = self._staging.capture(leaves)
            if snap is not None:
                self._worker.submit(
                    name,
                    lambda: self._persist(
                        name, seq, step, epoch, metrics, tree, snap, created, waited=waited
                    ),
                )
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
    ) -> Checkpoint:
        """Write, commit, log and apply retention: the same protocol sync or async."""
        started = time.perf_counter()
        staged = self.storage.stage(name)
        try:
            files, locations = self.format.write(
                self.storage, staged, leaves, shard_bytes=self.shard_bytes
            )
            manifest = Manifest(
                name=name,
                seq=seq,
                step=step,
                epoch=epoch,
                created=created,
                metrics=metrics,
                tree=tree,
                tensors={leaf.key: {**leaf.entry(), **locations[leaf.key]} for leaf in leaves},
                files=files,
                payload=self.format.name,
            )
            self.storage.write_file(
                f"{staged}/{MANIFEST_NAME}", manifest.to_bytes(), stage="manifest"
            )
            self.storage.commit(staged, name)
        except BaseException:
            self.storage.discard(staged)
            raise
        seconds = time.perf_counter() - started
        ckpt = replace(self._to_checkpoint(manifest), name=name)
        self._cache.pop(name, None)
        runlog.record(
            self.storage,
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
        return ckpt

    def log_skip(
        self,
        *,
        step: int | None = None,
        epoch: int | None = None,
        metrics: dict[str, Any] | None = None,
        reason: str = "",
    ) -> None:
        """Record in the run log that a checkpoint was considered and not saved."""
        runlog.record(
            self.storage,
            "skip",
            step=step,
            epoch=epoch,
            metrics=_metrics_arg(metrics),
            reason=reason,
        )

    def _apply_retention(self) -> None:
        if self.keep is None:
            return
        current = self.checkpoints()
        keep = self.keep.select(current, monitor=self.monitor, mode=self.mode)
        for ckpt in current:
            if ckpt.name in keep:
                continue
            self.storage.remove(ckpt.name)
            self._cache.pop(ckpt.name, None)
            runlog.record(
                self.storage,
                "delete",
                name=ckpt.name,
                seq=ckpt.seq,
                step=ckpt.step,
                metrics=ckpt.metrics,
                reason="retention",
            )

    # -- restoring ---------------------------------------------------------------------
    def _has_manifest(self, name: str) -> bool:
        try:
            return self.storage.exists(f"{name}/{MANIFEST_NAME}")
        except SafepointError:
            return True  # there, but refused (a link): a damaged checkpoint
        except OSError:
            return False

    def _resolve(self, checkpoint: str | int) -> list[str]:
        """Candidate names for ``checkpoint``, best candidate first."""
        if checkpoint == "latest":
            listed = [c.name for c in reversed(self.checkpoints())]
            # A directory whose manifest exists but does not parse (damaged, or written
            # by a newer safepoint) is not listed, yet the root is not empty: try it
            # last so restore() reports it rather than claim there is nothing to resume.
            broken = [n for n in self._entries() if n not in listed and self._has_manifest(n)]
            return listed + broken
        if checkpoint == "best":
            if self.monitor is None:
                raise ConfigError(
                    "restore(checkpoint='best') needs a monitor. Received: monitor=None. "
                    "Create the manager with monitor='val_loss' (or the metric you track)."
                )
            best = self.best()
            return [best.name] if best else []
        if isinstance(checkpoint, int) and not isinstance(checkpoint, bool):
            matches = [c.name for c in reversed(self.checkpoints()) if c.step == checkpoint]
            if not matches:
                raise CheckpointNotFoundError(
                    f"No committed checkpoint with step={checkpoint} in {self.storage.root}. "
                    f"Expected one of {[c.step for c in self.checkpoints()]}."
                )
            return matches[:1]
        if isinstance(checkpoint, str):
            from .storage import check_name

            return [check_name(checkpoint)]
        raise ConfigError(
            "checkpoint must be 'latest', 'best', a checkpoint name or a step number. "
            f"Received: checkpoint={checkpoint!r}."
        )

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
        candidates = self._resolve(checkpoint)
        if not candidates:
            if missing_ok:
                return None
            raise CheckpointNotFoundError(
                f"No committed checkpoint in {self.storage.root} to restore "
                f"(checkpoint={checkpoint!r}). Expected at least one save before restoring. "
                "Pass missing_ok=True to start fresh when there is none."
            )
        errors: list[str] = []
        tried: set[str] = set()
        while candidates:
            name = candidates.pop(0)
            tried.add(name)
            try:
                found = reader.read_manifest(self.storage, name)
                loaded = reader.read_state(self.storage, name, found)
            except CheckpointNotFoundError:
                if checkpoint != "latest":
                    raise
                # The writer's retention deleted it after this reader listed the root:
                # newer checkpoints exist, so list again instead of giving up.
                candidates = [n for n in self._resolve(checkpoint) if n not in tried]
                continue
            except _UNREADABLE as exc:
                if checkpoint != "latest":
                    raise
                log.warning("safepoint: skipping %s while restoring latest: %s", name, exc)
                errors.append(f"{name}: {exc}")
                continue
            if state is not None:
                restore_into(state, loaded, strict=strict)
            if errors:
                log.warning(
                    "safepoint: restored %s after skipping %d newer checkpoint(s)",
                    name,
                    len(errors),
                )
            ckpt = replace(
                self._to_checkpoint(found), name=name, path=os.path.join(self.storage.root, name)
            )
            return replace(ckpt, state=loaded)
        raise CorruptCheckpointError(
            f"No checkpoint in {self.storage.root} verifies; tried {len(errors)}: "
            + " | ".join(errors)
            + ". Restore from a backup or start a new run."
        )

    def verify(self) -> list[Verification]:
        """Check every checkpoint directory's manifest, sizes and checksums."""
        results = []
        for name in self._entries():
            try:
                reader.verify(self.storage, name)
                results.append(Verification(name))
            except CheckpointNotFoundError:
                continue  # deleted (by the writer's retention) since it was listed
            except FileNotFoundError:
                results.append(
                    Verification(
                        name,
                        IncompleteCheckpointError(
                            f"{name} has no manifest: it was never committed."
                        ),
                    )
                )
            except SafepointError as exc:
                results.append(Verification(name, exc))
        return results

    def metric(self, ckpt: Checkpoint) -> float | None:
        """The monitored metric of ``ckpt`` as a finite float (None if absent or NaN)."""
        return None if self.monitor is None else metric_value(ckpt.metrics, self.monitor)

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
        from .preemption import DEFAULT_SIGNALS, SaveOnSignal

        return SaveOnSignal(
            self,
            state,
            signals=DEFAULT_SIGNALS if signals is None else signals,
            grace_period=grace_period,
            exit_code=exit_code,
        )
