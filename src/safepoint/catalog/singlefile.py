"""Single-file checkpoints: HDF5 (``.h5``, ``.hdf5``, ``.weights.h5``), ``.keras``, ``.ckpt``.

Frameworks read their own files (``model.load_weights("weights.best.hdf5")``), so the
Keras drop-in writes exactly those files; this module gives them what a checkpoint
directory has. Writing one (:func:`stage`, then :func:`finish`) is the commit
transaction of :mod:`safepoint.storage.commit` with a file target: the framework
writes ``checkpoint<suffix>`` in a marked staging entry of the root, safepoint's
manifest is sealed into the file (its content hashed), and the transaction fsyncs it
and swaps it in under its name. A kill at any moment leaves the old file or the new
one, never a truncated one, plus at worst a hidden entry that the next writer's
cleanup recovers or removes. ``CheckpointManager.save_file`` is the public entry.

How the manifest sits inside each kind of file, and what its checksums cover, is
:mod:`safepoint.ondisk.embedded`'s business.

The manager lists these files beside checkpoint directories (``is_single_file``),
and ``reader`` dispatches here to read, verify and load them. Nothing is unpickled;
HDF5 links, external and virtual storage are refused, and sizes are checked before
anything is read.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from typing import Any, BinaryIO

from safepoint.catalog import remotefile
from safepoint.errors import ConfigError, IncompleteCheckpointError, SafepointError, StorageError
from safepoint.formats import treezip
from safepoint.ondisk import embedded, manifest
from safepoint.ondisk.container import CONTAINER
from safepoint.ondisk.embedded import KEY
from safepoint.ondisk.manifest import Manifest
from safepoint.ondisk.template import bounded
from safepoint.ondisk.ziparchive import open_zip, zip_entries
from safepoint.storage import commit as transaction
from safepoint.storage import protocol
from safepoint.storage.local import (
    Storage,
    check_name,
    component_problem,
    translate,
)

log = logging.getLogger("safepoint")

SUFFIXES = (".weights.h5", ".keras", ".ckpt", ".hdf5", ".h5")

#: Embedded manifests already read, by file identity: listing a directory of large
#: files re-reads only the ones that changed (a commit always makes a new inode).
_seen: dict[tuple[Any, ...], bytes] = {}


def container(name: str) -> str | None:
    """``"zip"`` for ``.keras`` and ``.ckpt`` (a state tree zip, :mod:`safepoint.formats.treezip`),
    ``"hdf5"`` for HDF5 suffixes, None otherwise."""
    if name.endswith((".keras", ".ckpt")):
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
    if _remote(storage):
        return remotefile.is_file_checkpoint(storage, name)
    path = protocol.local_path(storage, name)
    if path is None:
        return False
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        if name.endswith(".ckpt") and not _is_zip(path):
            return False  # a legacy torch.save pickle (Lightning's own): not ours
        manifest_bytes(storage, name)
    except OSError:  # no embedded manifest (FileNotFoundError), or unreadable
        return False
    except SafepointError:
        return True
    return True


def _is_zip(path: str) -> bool:
    """Whether the file begins like a zip (a ``.ckpt`` is ours only if it is one)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _remote(storage: Storage) -> bool:
    """A root that is not a local directory: files go through :mod:`.remotefile`."""
    return not isinstance(storage, protocol.LocalFiles)


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
    if _remote(storage):
        return remotefile.record_bytes(storage, name)
    with _open(storage, name) as f:
        return _manifest_bytes(storage, name, f)


def _manifest(storage: Storage, name: str, f: BinaryIO | None) -> Manifest:
    try:
        data = (
            remotefile.record_bytes(storage, name)
            if f is None
            else _manifest_bytes(storage, name, f)
        )
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
    if _remote(storage):
        return _manifest(storage, name, None)  # its record: the same bytes
    with _open(storage, name) as f:
        return _manifest(storage, name, f)


def _contents(f: BinaryIO, name: str, record: dict[str, Any], *, as_numpy: bool) -> Any:
    """Verify the open file and read what it holds: a Keras file's weights as numpy
    arrays, or a state tree zip's whole state (torch tensors unless ``as_numpy``)."""
    if record.get("layout") != treezip.LAYOUT:
        return embedded.arrays(f, name, record)
    kept = {treezip.STATE_ENTRY: b"", treezip.TENSORS_ENTRY: b""}
    with open_zip(f, name) as z:
        zip_entries(z, name, record.get("entries", {}), keep=kept)
    state, tensors = kept[treezip.STATE_ENTRY], kept[treezip.TENSORS_ENTRY]
    return treezip.read(name, state, tensors, as_numpy=as_numpy)


def read_state(storage: Storage, name: str, found: Manifest, *, as_numpy: bool = True) -> Any:
    """Verify checkpoint file ``name`` and return what it holds (see :func:`_contents`)."""
    if _remote(storage):
        with remotefile.fetched(storage, name, _kind(name)) as (local, _):
            return read_state(local, name, found, as_numpy=as_numpy)
    with _open(storage, name) as f:
        return _contents(f, name, found.extra[KEY], as_numpy=as_numpy)


def read_checkpoint(storage: Storage, name: str, *, as_numpy: bool = True) -> tuple[Manifest, Any]:
    """The manifest and contents of checkpoint file ``name``, both from one version."""
    if _remote(storage):
        with remotefile.fetched(storage, name, _kind(name)) as (local, _):
            return read_checkpoint(local, name, as_numpy=as_numpy)
    with _open(storage, name) as f:
        found = _manifest(storage, name, f)
        return found, _contents(f, name, found.extra[KEY], as_numpy=as_numpy)


def verify(storage: Storage, name: str) -> Manifest:
    """Check the embedded manifest and the checksums of checkpoint file ``name``."""
    if _remote(storage):
        with remotefile.fetched(storage, name, _kind(name)) as (local, _):
            return verify(local, name)
    with _open(storage, name) as f:
        found = _manifest(storage, name, f)
        embedded.check(f, name, found.extra[KEY])
    return found


# ---------------------------------------------------------------------------- writing
def _fault(storage: Storage) -> transaction.Fault:
    return getattr(storage, "_fault", lambda stage, target: None)


def stage(storage: Storage, name: str, write: Callable[[str], None]) -> str:
    """Write the file in a marked staging entry of the root; return the entry name.

    ``write`` must create the file at the path it is given (the name keeps the final
    suffix, as framework savers check suffixes). The staging entry has a fixed-length
    name (:mod:`safepoint.storage.leftovers`), so any checkpoint name can be staged.
    """
    if _remote(storage):
        _fault(storage)("write", name)
        return remotefile.stage(name, write)  # a local temporary directory
    root = storage.root
    entry = transaction.stage(root, name, _fault(storage))
    try:
        staged = os.path.join(root, transaction.staged_file(entry, suffix(name)))
        with translate("write", os.path.join(root, name)):
            _fault(storage)("write", name)
            write(staged)
    except BaseException:
        transaction.discard(root, entry)
        raise
    return entry


def discard(storage: Storage, entry: str) -> None:
    if _remote(storage):
        remotefile.discard(entry)
        return
    transaction.discard(storage.root, entry)


def finish(storage: Storage, entry: str, draft: Manifest, layout: str) -> Manifest:
    """Seal the staged file and commit it (:func:`safepoint.storage.commit.commit`)."""
    if _remote(storage):
        return _finish_remote(storage, entry, draft, layout)
    name = draft.name
    root = storage.root
    kind = container(name)
    assert kind is not None
    staged = os.path.join(root, transaction.staged_file(entry, suffix(name)))
    try:
        problem = remotefile.not_a_file(staged)
        if problem is not None:
            raise StorageError(
                f"The framework wrote no file for checkpoint {name!r}. Expected write_fn(path) "
                f"to create a regular file at the path it is given. Received: {problem}. "
                "Check the function passed to save_file.",
                stage="write",
            )
        with translate("manifest", staged):
            _fault(storage)("manifest", name)
            sealed, data = embedded.seal(staged, kind, name, draft, layout)
    except BaseException:
        transaction.discard(root, entry)
        raise
    transaction.commit(root, entry, name, "file", _fault(storage), suffix=suffix(name))
    # The next listing reads this file's manifest from memory, not from the file.
    _seen[_identity(os.path.join(root, name))] = data
    return sealed


def _finish_remote(storage: Storage, entry: str, draft: Manifest, layout: str) -> Manifest:
    """Seal the file in its local temporary directory, upload and commit it."""
    name = draft.name
    try:
        with translate("manifest", os.path.join(entry, name)):
            _fault(storage)("manifest", name)
            sealed, data = embedded.seal(
                os.path.join(entry, name), _kind(name), name, draft, layout
            )
        remotefile.upload(storage, entry, name, data)
    finally:
        remotefile.discard(entry)
    return sealed


def _kind(name: str) -> str:
    kind = container(name)
    assert kind is not None
    return kind


def body(
    name: str,
    *,
    seq: int,
    step: int | None,
    epoch: int | None,
    metrics: dict[str, Any],
    series: str | None = None,
) -> Manifest:
    """The manifest of checkpoint file ``name`` before its seal (its ``seq`` is set at commit).

    Checks the name first, so a bad one fails before the framework writes anything.
    """
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
        extra={
            CONTAINER: container(name),
            **({} if series is None else {"series": series}),
        },
    )


__all__ = [
    "SUFFIXES",
    "body",
    "container",
    "discard",
    "finish",
    "is_single_file",
    "manifest_bytes",
    "read_checkpoint",
    "read_manifest",
    "read_state",
    "stage",
    "suffix",
    "verify",
]
