"""Single-file checkpoints: HDF5 (``.h5``, ``.hdf5``, ``.weights.h5``) and ``.keras`` zips.

Frameworks read their own files (``model.load_weights("weights.best.hdf5")``), so the
Keras drop-in writes exactly those files; this module gives them what a checkpoint
directory has. The commit protocol is the directory one, for one file:

1. stage: the framework writes ``checkpoint<suffix>`` in a marked hidden directory
   ``.sp.tmp-<random>`` of the destination directory (same file system, so the rename
   below is atomic; see :mod:`safepoint.storage.leftovers`);
2. seal: the content is hashed and safepoint's manifest is embedded in the file (a
   ``safepoint_manifest`` root attribute in HDF5, a ``safepoint-manifest.json`` entry
   in the zip); then the file is ``fsync``-ed;
3. commit: ``rename`` over the final name, then ``fsync`` the directory.

A kill at any moment leaves the old file or the new one, never a truncated one, plus
at worst a hidden staging entry that ``LocalStorage.cleanup_stale`` removes (or,
on a file system without hard links, the old file in a trash entry that it puts back).

How the manifest sits inside each kind of file, and what its checksums cover, is
:mod:`safepoint.ondisk.embedded`'s business.

The manager lists these files beside checkpoint directories (``is_single_file``),
and ``reader`` dispatches here to read, verify and load them. Nothing is unpickled;
HDF5 links, external and virtual storage are refused, and sizes are checked before
anything is read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, BinaryIO

from safepoint.catalog.writer import metrics_arg
from safepoint.checkpoint import Checkpoint
from safepoint.errors import ConfigError, IncompleteCheckpointError, SafepointError, StorageError
from safepoint.ondisk import embedded, manifest
from safepoint.ondisk.embedded import KEY
from safepoint.ondisk.manifest import Manifest
from safepoint.ondisk.template import bounded
from safepoint.storage import leftovers, protocol, rootlock, runlog
from safepoint.storage.local import (
    Storage,
    check_name,
    component_problem,
    translate,
)

log = logging.getLogger("safepoint")

SUFFIXES = (".weights.h5", ".keras", ".hdf5", ".h5")
_STAGED = re.compile(r"^\.sp\.tmp-[0-9a-f]{8}(\.keras|\.weights\.h5|\.hdf5|\.h5)$")

#: Embedded manifests already read, by file identity: listing a directory of large
#: files re-reads only the ones that changed (a commit always makes a new inode).
_seen: dict[tuple[Any, ...], bytes] = {}


def container(name: str) -> str | None:
    """``"zip"`` for ``.keras``, ``"hdf5"`` for HDF5 suffixes, None otherwise."""
    if name.endswith(".keras"):
        return "zip"
    if name.endswith((".h5", ".hdf5")):
        return "hdf5"
    return None


def suffix(name: str) -> str:
    return next(s for s in SUFFIXES if name.endswith(s))


def is_single_file(storage: Storage, name: str) -> bool:
    """True when ``name`` is a file safepoint committed (or one that claims to be).

    Files of the same suffixes written by anything else (a ``model.save`` beside the
    checkpoints) are not checkpoints: listing, verifying and retention ignore them.
    A file whose embedded manifest is damaged still counts, so that it is reported.
    """
    if container(name) is None or component_problem(name) is not None:
        return False  # e.g. a stray "C:\\x\\model.h5": not a name safepoint writes
    path = protocol.local_path(storage, name)
    if path is None:
        return False
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        manifest_bytes(storage, name)
    except OSError:  # no embedded manifest (FileNotFoundError), or unreadable
        return False
    except SafepointError:
        return True
    return True


def _path(storage: Storage, name: str) -> str:
    path = protocol.local_path(storage, name)
    if path is None:
        raise StorageError(
            f"Single-file checkpoints need a local file system. Received: root={storage.root!r}.",
            stage="read",
        )
    return path


def _identity(path: str, info: os.stat_result | None = None) -> tuple[Any, ...]:
    """What tells one committed file from another under ``path`` (a commit is a new
    inode); ``info`` is the ``fstat`` of a descriptor already open, if any."""
    if info is None:
        info = os.lstat(path)
    return (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


# ---------------------------------------------------------------------------- reading
# Every read opens the file once, without following a link (``open_read``: O_NOFOLLOW,
# a regular file checked on the descriptor), and reads the manifest and the data
# through that descriptor: a file re-committed (``os.replace``) or swapped for a link
# meanwhile cannot mix two versions, or lead out of the root.
def _open(storage: Storage, name: str) -> BinaryIO:
    _path(storage, name)
    return storage.open_read(name)


def _manifest_bytes(storage: Storage, name: str, f: BinaryIO) -> bytes:
    ident = _identity(_path(storage, name), os.fstat(f.fileno()))
    if ident not in _seen:
        kind = container(name)
        assert kind is not None
        data = embedded.manifest_bytes(f, kind, name)
        if len(_seen) > 4096:
            _seen.clear()
        _seen[ident] = data
    return _seen[ident]


def manifest_bytes(storage: Storage, name: str) -> bytes:
    """The embedded manifest of ``name``; ``FileNotFoundError`` when it has none."""
    with _open(storage, name) as f:
        return _manifest_bytes(storage, name, f)


def _manifest(storage: Storage, name: str, f: BinaryIO) -> Manifest:
    try:
        data = _manifest_bytes(storage, name, f)
    except FileNotFoundError:
        raise IncompleteCheckpointError(
            f"{storage.root}/{name} has no embedded safepoint manifest: it was not written "
            "by safepoint. Expected a file saved by safepoint.keras. Load it with the "
            "framework that wrote it."
        ) from None
    kind = container(name)
    where = f"{name}[{embedded.ATTR if kind == 'hdf5' else embedded.ZIP_ENTRY}]"
    found = manifest.parse(data, where=where)
    embedded.check_record(name, found.extra.get(KEY), kind)
    return found


def read_manifest(storage: Storage, name: str) -> Manifest:
    """The validated manifest embedded in checkpoint file ``name``."""
    with _open(storage, name) as f:
        return _manifest(storage, name, f)


def read_state(storage: Storage, name: str, found: Manifest) -> dict[str, Any]:
    """Verify checkpoint file ``name`` and return its weights as a tree of numpy arrays."""
    with _open(storage, name) as f:
        return embedded.arrays(f, name, found.extra[KEY])


def read_checkpoint(storage: Storage, name: str) -> tuple[Manifest, dict[str, Any]]:
    """The manifest and weights of checkpoint file ``name``, both from one version."""
    with _open(storage, name) as f:
        found = _manifest(storage, name, f)
        return found, embedded.arrays(f, name, found.extra[KEY])


def verify(storage: Storage, name: str) -> Manifest:
    """Check the embedded manifest and the checksums of checkpoint file ``name``."""
    with _open(storage, name) as f:
        found = _manifest(storage, name, f)
        embedded.check(f, name, found.extra[KEY])
    return found


# ---------------------------------------------------------------------------- writing
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stage(storage: Storage, name: str, write: Callable[[str], None]) -> str:
    """Write the file in a marked staging directory in the root; return its path.

    ``write`` must create the file at the path it is given (the name keeps the final
    suffix, as framework savers check suffixes). The staging directory has a
    fixed-length name (:mod:`safepoint.storage.leftovers`), so any checkpoint name can be staged.
    """
    fault = getattr(storage, "_fault", lambda stage, target: None)
    staged: str | None = None
    try:
        with translate("write", os.path.join(storage.root, name)):
            os.makedirs(storage.root, exist_ok=True)
            entry = leftovers.make_stage(storage.root, name)
            staged = os.path.join(storage.root, entry, f"checkpoint{suffix(name)}")
            fault("write", name)
            write(staged)
    except BaseException:
        _discard(staged)
        raise
    return staged


def _discard(staged: str | None) -> None:
    if staged is not None:
        stage_dir, entry = os.path.dirname(staged), os.path.basename(os.path.dirname(staged))
        leftovers.remove_entry(stage_dir)
        rootlock.unmark_live(os.path.dirname(stage_dir), entry)


def _finish(storage: Storage, staged: str, body: Manifest, layout: str) -> Manifest:
    """Seal the staged file, make it durable and rename it over its final name."""
    fault = getattr(storage, "_fault", lambda stage, target: None)
    name = body.name
    root = storage.root
    final = os.path.join(root, name)
    kind = container(name)
    assert kind is not None
    try:
        with translate("manifest", staged):
            fault("manifest", name)
            sealed, data = embedded.seal(staged, kind, name, body, layout)
        # The bytes must be durable before the name points at them, and the directory
        # entry durable before the commit is reported: a power loss afterwards must
        # find the new file, and one before it the old file.
        with translate("fsync", staged):
            fault("fsync", name)
            _fsync(staged)
        # The file this one replaces keeps a second, hidden name until the new one is
        # durable, so a failed directory fsync can put it back: a save that raises must
        # leave the previous checkpoint, not a new file that could vanish on power loss.
        # (A crash leaves the trash entry for ``LocalStorage.cleanup_stale``.)
        kept: str | None = None
        with translate("rename", final):
            fault("rename", name)
            if os.path.lexists(final):
                kept = leftovers.keep_for_replace(root, name)
            try:
                os.replace(staged, final)
            except BaseException:
                if kept is not None:
                    leftovers.put_back_file(root, kept, final)
                raise
        try:
            with translate("dir-fsync", root):
                fault("dir-fsync", name)
                _fsync(root)
        except BaseException:
            with contextlib.suppress(OSError):
                if kept is not None:
                    leftovers.put_back_file(root, kept, final)
                else:
                    os.unlink(final)
            raise
        if kept is not None:  # the old file, now out of the listing
            leftovers.remove_entry(os.path.join(root, kept))
    finally:
        _discard(staged)
    # The next listing reads this file's manifest from memory, not from the file.
    _seen[_identity(final)] = data
    return sealed


def commit(
    storage: Storage,
    name: str,
    write: Callable[[str], None],
    *,
    seq: int,
    step: int | None,
    epoch: int | None,
    metrics: dict[str, Any],
    layout: str,
    series: str | None = None,
) -> Manifest:
    """Write checkpoint file ``name`` with ``write(staged_path)`` and commit it atomically."""
    body = _body(name, seq=seq, step=step, epoch=epoch, metrics=metrics, series=series)
    return _finish(storage, _stage(storage, name, write), body, layout)


def _body(
    name: str,
    *,
    seq: int,
    step: int | None,
    epoch: int | None,
    metrics: dict[str, Any],
    series: str | None = None,
) -> Manifest:
    check_name(name)
    if container(name) is None:
        raise ConfigError(
            f"Invalid single-file checkpoint name. Expected a name ending in one of "
            f"{', '.join(SUFFIXES)}. Received: name={name!r}. Give the file one of those "
            "suffixes, or save a checkpoint directory with CheckpointManager.save."
        )
    return Manifest(
        name=name,
        seq=seq,
        step=bounded("step", step),
        epoch=bounded("epoch", epoch),
        created=manifest.now(),
        metrics=metrics,
        tree=None,
        tensors={},
        files={},
        payload="hdf5",
        extra={} if series is None else {"series": series},
    )


def begin(
    manager: Any,
    name: str,
    write: Callable[[str], None],
    *,
    step: int | None,
    epoch: int | None,
    metrics: dict[str, Any],
    layout: str,
) -> Callable[[], Checkpoint]:
    """Write checkpoint file ``name`` into ``manager``'s root; return what commits it.

    The file is written (the model captured) before this returns; the returned
    function seals, fsyncs and renames it, logs the save and applies retention. It may
    run on another thread (a :class:`~safepoint.storage.worker.SaveWorker`) so training goes on
    meanwhile. The caller holds the root's writer lock from before ``begin`` until the
    commit is done.
    The ``seq`` continues the manager's listing, so files and checkpoint directories in
    one root share one order; the file records the manager's series (its name
    template), and ``Keep`` prunes only that series, files and directories alike.
    """
    storage = manager.storage
    metrics = metrics_arg(metrics)
    body = _body(
        name,
        seq=0,
        step=step,
        epoch=epoch,
        metrics=metrics,
        series=getattr(manager, "series", None),
    )
    check = getattr(manager, "check_monitor", None)
    if check is not None:
        check(metrics)  # before anything is written
    started = time.perf_counter()
    staged = _stage(storage, name, write)

    def finish() -> Checkpoint:
        # Listing the root (for seq) is part of the commit, off the training thread;
        # the root's save mutex orders it with the other writers of this process.
        serial = getattr(storage, "serial", None)
        with serial() if serial is not None else contextlib.nullcontext():
            try:
                seq = manager.next_seq()
            except BaseException:
                _discard(staged)
                raise
            found = _finish(storage, staged, replace(body, seq=seq), layout)
            try:  # best effort: a committed save is never reported as failed for its log line
                runlog.record(
                    storage,
                    "save",
                    name=name,
                    seq=seq,
                    step=step,
                    epoch=epoch,
                    metrics=metrics,
                    bytes=int(found.extra[KEY].get("size", 0)),
                    seconds=round(time.perf_counter() - started, 6),
                )
            except SafepointError as exc:
                log.warning("safepoint: could not write the run log (save): %s", exc)
            manager._apply_retention()
        return Checkpoint(
            name=name,
            path=os.path.join(storage.root, name),
            step=step,
            epoch=epoch,
            metrics=dict(found.metrics),
            created=found.created,
            seq=seq,
        )

    return finish


def save(
    manager: Any,
    name: str,
    write: Callable[[str], None],
    *,
    step: int | None,
    epoch: int | None,
    metrics: dict[str, Any],
    layout: str,
) -> Checkpoint:
    """Write and commit checkpoint file ``name`` through ``manager`` (see :func:`begin`)."""
    manager.storage.lock()
    return begin(manager, name, write, step=step, epoch=epoch, metrics=metrics, layout=layout)()


def is_staged(entry: str) -> bool:
    """True for a staging file name this module creates (``.sp.tmp-<8 hex><suffix>``).

    :meth:`safepoint.storage.local.LocalStorage.cleanup_stale` removes such files, and only
    such names, so a user's own files in the same directory are never at risk.
    """
    return _STAGED.match(entry) is not None
