"""Reading committed checkpoints: manifests, verified payloads, rebuilt state trees.

Shared by :class:`~safepoint.CheckpointManager` and :func:`safepoint.load`. Nothing
here writes: restoring from a read-only root works and leaves it untouched.

A writer may re-save a name while it is read (a directory swapped in, a single file
replaced): :func:`read_checkpoint` and :func:`verify` read one version whole, through
the directory or file descriptor they opened first (:mod:`safepoint.storage.held`).
"""

from __future__ import annotations

import io
import os
import stat
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from safepoint import formats
from safepoint.catalog import chunked, singlefile, versions
from safepoint.catalog.lazytree import lazy_unflatten
from safepoint.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    IncompleteCheckpointError,
)
from safepoint.formats.safetensors import FILES_IN_FLIGHT
from safepoint.ondisk import checksum, manifest
from safepoint.ondisk.manifest import Manifest
from safepoint.state.tree import unflatten
from safepoint.storage import held, parallel, rangeimage
from safepoint.storage.local import LocalStorage, Storage, check_name
from safepoint.storage.protocol import LocalFiles
from safepoint.storage.urls import is_url, open_url, split_url


def read_manifest(storage: Storage, name: str) -> Manifest:
    """The validated manifest of checkpoint ``name`` (a directory or a single file)."""
    if singlefile.is_single_file(storage, name):
        return singlefile.read_manifest(storage, name)
    return _dir_manifest(storage, name)


def _dir_manifest(storage: Storage, name: str) -> Manifest:
    relpath = f"{name}/{manifest.NAME}"
    try:
        data = storage.read_bytes(relpath, max_size=manifest.MAX_BYTES)
    except FileNotFoundError:
        if storage.exists(name):
            raise IncompleteCheckpointError(
                f"{storage.root}/{name} has no {manifest.NAME}: it is not a committed "
                "checkpoint (a folder of your own, or a save interrupted before its commit). "
                "safepoint never lists, loads or deletes it. Expected a committed checkpoint. "
                "Move it out of the root if it is yours; delete it once you know it holds "
                "nothing you need."
            ) from None
        raise CheckpointNotFoundError(
            f"No checkpoint named {name!r} in {storage.root}. Expected one of the names "
            "'safepoint ls ROOT' prints."
        ) from None
    except NotADirectoryError:
        raise IncompleteCheckpointError(
            f"{storage.root}/{name} is a file, not a checkpoint directory."
        ) from None
    return manifest.parse(data, where=f"{name}/{manifest.NAME}")


def _preopen(view: Storage, name: str, found: Manifest) -> None:
    if isinstance(view, LocalStorage):
        held.preopen(view, [f"{name}/{fname}" for fname in found.files])


def read_checkpoint(
    storage: Storage, name: str, *, as_numpy: bool = False, lazy: bool = False
) -> tuple[Manifest, Any]:
    """The manifest and state tree of one committed version of checkpoint ``name``.

    Unlike :func:`read_manifest` then :func:`read_state`, the two come from the same
    version even while a writer re-saves the name: a directory is held open (and
    read again from the top if it was replaced mid-read), a single file read through
    one descriptor.
    """
    if singlefile.is_single_file(storage, name):
        return singlefile.read_checkpoint(storage, name)

    def read(view: Storage) -> tuple[Manifest, Any]:
        found = _dir_manifest(view, name)
        _preopen(view, name, found)
        return found, read_state(view, name, found, as_numpy=as_numpy, lazy=lazy)

    return versions.consistent(storage, name, read)


def read_state(
    storage: Storage, name: str, found: Manifest, *, as_numpy: bool = False, lazy: bool = False
) -> Any:
    """Read, verify and rebuild the state tree of a committed checkpoint.

    ``lazy`` (safetensors payloads): map the files and skip reading and checksumming.
    A writer may re-save ``name`` after ``found`` was read: :func:`read_checkpoint`
    reads both from one version.
    """
    if singlefile.KEY in found.extra:
        return singlefile.read_state(storage, name, found)
    raw = _payloads(storage, name, found, lazy=lazy)
    cache: dict[str, Any] = {}

    def tensor(key: str) -> Any:
        if key not in cache:
            if key not in raw:
                raise CorruptCheckpointError(
                    f"{name}: tensor {key!r} is listed in the manifest but was not read from "
                    "its payload file.",
                    file=name,
                )
            data = rangeimage.fetched(raw[key])  # a lazy object-store range: read now
            cache[key] = formats.materialize(found.tensors[key], data, as_numpy=as_numpy)
        return cache[key]

    if any(isinstance(v, rangeimage.LazyImage) for v in raw.values()):
        return lazy_unflatten(found.tree, tensor)  # entries read when first accessed
    return unflatten(found.tree, tensor)


def read_raw(storage: Storage, name: str) -> tuple[Manifest, dict[str, np.ndarray]]:
    """The manifest and every tensor's verified raw bytes of checkpoint directory ``name``,
    both of one version (as :func:`read_checkpoint`): for tools that copy or compare
    payloads (``convert``, ``diff``) without rebuilding the state."""

    def read(view: Storage) -> tuple[Manifest, dict[str, np.ndarray]]:
        found = _dir_manifest(view, name)
        _preopen(view, name, found)
        return found, _payloads(view, name, found)

    return versions.consistent(storage, name, read)


def _payloads(
    storage: Storage, name: str, found: Manifest, *, lazy: bool = False
) -> dict[str, np.ndarray]:
    try:
        fmt = formats.get(found.payload)
    except ConfigError as exc:  # its reader is not installed (h5py): this process cannot
        raise IncompatibleCheckpointError(str(exc)) from exc  # read it; an older one may
    try:
        raw = fmt.read(storage, name, chunked.without_chunked(found), lazy=lazy and fmt.lazy)
        raw.update(chunked.read_whole(storage, name, found))  # a multi-rank save's tensors
    except FileNotFoundError as exc:
        versions.raise_if_deleted(storage, name)
        # A payload the manifest lists is gone: the checkpoint is damaged, and
        # restore("latest") must be able to skip it like any other corruption.
        fname = os.path.basename(str(exc.filename or "")) or "a payload file"
        shared = {str(info["blob"]): f for f, info in found.files.items() if "blob" in info}
        advice = "Restore an older checkpoint."
        if fname in shared:  # an object store names the blob object, not the file
            fname, advice = (
                shared[fname],
                (
                    f"It is the shared dedup blob {fname}: every checkpoint that lists it in "
                    "'safepoint verify' is damaged too; restore one that does not."
                ),
            )
        raise CorruptCheckpointError(
            f"{name}/{fname} is listed in the manifest but missing. Expected every payload "
            f"file of the manifest. Received: no file. {advice}",
            file=f"{name}/{fname}",
            actual=None,
        ) from None
    return raw


def verify(storage: Storage, name: str) -> Manifest:
    """Check a checkpoint's manifest and every payload file's size and checksum."""
    if singlefile.is_single_file(storage, name):
        return singlefile.verify(storage, name)

    def check(view: Storage) -> Manifest:
        found = _dir_manifest(view, name)
        _preopen(view, name, found)

        def one(fname: str, info: dict[str, Any]) -> Callable[[], None]:
            return lambda: _check_file(view, name, fname, info)

        # streamed and hashed file by file; on an object store several at once (each
        # costs round trips: a dedup checkpoint has one file per shared tensor)
        workers = 1 if isinstance(view, LocalFiles) else FILES_IN_FLIGHT
        parallel.run_all([one(f, info) for f, info in found.files.items()], workers)
        return found

    return versions.consistent(storage, name, check)


def _check_file(storage: Storage, name: str, fname: str, info: dict[str, Any]) -> None:
    relpath = f"{name}/{fname}"
    try:
        f = storage.open_read(relpath)
    except FileNotFoundError:
        versions.raise_if_deleted(storage, name)
        raise CorruptCheckpointError(
            f"{relpath} is listed in the manifest but missing. Expected {info['size']} "
            "bytes. Received: no file. Restore an older checkpoint.",
            file=relpath,
            expected=info["size"],
            actual=None,
        ) from None
    with f:
        size = f.seek(0, io.SEEK_END)  # of the file opened: a re-save cannot change it
        f.seek(0)
        checksum.check_size(relpath, expected=int(info["size"]), actual=size)
        checksum.check(
            relpath,
            expected=info[checksum.ALGORITHM],
            actual=checksum.hash_stream(f, size, file=relpath),
        )


def refuse_pickle(path: str) -> IncompatibleCheckpointError:
    """The error for a file given where a checkpoint directory belongs (often a pickle)."""
    return IncompatibleCheckpointError(
        f"{path} is a file, not a safepoint checkpoint directory; safepoint never opens pickle "
        "files (torch.save, .pt/.pth/.ckpt) because loading one can run arbitrary code. "
        "Expected a directory with manifest.json. To import it, in an environment you trust "
        "run: state = torch.load(path, weights_only=True); then "
        "safepoint.CheckpointManager(ROOT).save(state, step=...)."
    )


def load(
    path: str | os.PathLike[str],
    *,
    as_numpy: bool = True,
    mmap: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Read one checkpoint directory as a plain tree (numpy arrays + JSON values).

    ``path`` may be a URL, ``s3://BUCKET/PREFIX/NAME`` (configured by
    ``storage_options`` or the ``AWS_*`` variables, as for a manager's root).

    ``as_numpy=False`` returns torch tensors where torch tensors were saved; import
    torch first (safepoint never loads a framework itself). Every payload checksum is
    verified; nothing is ever unpickled.

    ``mmap=True`` returns at once with arrays that are copy-on-write views of the
    mapped payload files: only the bytes that are touched are ever read, which suits
    inspecting a few tensors of a large checkpoint. The price: tensor bytes are not
    checksummed (headers, sizes and offsets still are validated); run
    ``CheckpointManager.verify()`` or load without ``mmap`` when that matters.

    On an object store ``mmap=True`` returns at once too: the dicts of the state come
    back as read-only mappings (:class:`safepoint.catalog.lazytree.LazyDict`), and a
    tensor's bytes are fetched (ranged GETs) when its entry is first looked up; the
    same price applies.
    """
    if not as_numpy and "torch" not in sys.modules:
        raise ConfigError(
            "load(as_numpy=False) returns torch tensors, but torch is not imported. "
            "Expected torch loaded by the program. Received: as_numpy=False. Run "
            "'import torch' first, or keep as_numpy=True for numpy arrays."
        )
    text = os.fspath(path)
    if isinstance(text, str) and is_url(text):
        return _load_url(text, as_numpy=as_numpy, mmap=mmap, storage_options=storage_options)
    if storage_options is not None:
        raise ConfigError(
            "storage_options configure object-store locations only. Expected an s3:// "
            f"path with them. Received: path={text!r}. Drop storage_options for a local path."
        )
    full = os.path.abspath(text)
    parent, name = os.path.split(full.rstrip(os.sep))
    check_name(name, what="checkpoint directory name")
    storage = LocalStorage(parent)
    if singlefile.is_single_file(storage, name):
        return singlefile.read_checkpoint(storage, name, as_numpy=as_numpy)[1]
    try:
        mode = os.lstat(full).st_mode
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"No checkpoint at {full}. Expected a directory.") from None
    if stat.S_ISREG(mode):
        raise refuse_pickle(full)
    if not stat.S_ISDIR(mode):  # a link (never followed, as in a root), a FIFO...
        raise held.refusal(storage.root, name)
    return read_checkpoint(storage, name, as_numpy=as_numpy, lazy=mmap)[1]


def _load_url(
    url: str, *, as_numpy: bool, mmap: bool, storage_options: Mapping[str, Any] | None
) -> Any:
    """:func:`load` of a checkpoint in an object store: every payload is read and
    checksummed, or with ``mmap`` each tensor is fetched when first accessed."""
    root, name = split_url(url)
    check_name(name, what="checkpoint name")
    storage = open_url(root, storage_options)
    if not storage.is_dir(name):
        raise CheckpointNotFoundError(
            f"No committed checkpoint {name!r} in {root}. Expected {url} to name a "
            f"checkpoint of that root. Received: path={url!r}. Run 'safepoint ls {root}' "
            "for the names of its checkpoints."
        )
    return read_checkpoint(storage, name, as_numpy=as_numpy, lazy=mmap)[1]


__all__ = [
    "load",
    "read_checkpoint",
    "read_manifest",
    "read_raw",
    "read_state",
    "refuse_pickle",
    "verify",
]
