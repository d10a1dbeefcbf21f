"""Single-file checkpoints on roots that are not local directories (an object store).

Frameworks write their files through a local path (h5py, ``zipfile``), and an object
store has no rename, so a Keras ``.h5``/``.keras`` or Lightning ``.ckpt`` checkpoint on
such a root is stored the way a checkpoint directory is: the framework writes the file
into a private local temporary directory, safepoint seals its manifest into it as on
disk, then uploads the sealed file as the one payload file of a save, and commits by
writing the same manifest bytes as the save's record (``Storage.stage`` /
``open_write`` / ``write_file`` / ``commit``: on S3 the conditional create of
``<name>/manifest.json``). The name is listed once the record exists and never
before; a kill mid-upload leaves unreferenced payload that ``gc`` removes; retention
deletes the record first, then the payload.

Reading fetches the payload into a private temporary file and reads it with the local
code, which verifies every checksum, and refuses a file whose embedded manifest is not
byte-for-byte the record it was listed by. Listing reads only the records.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator

from safepoint.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from safepoint.ondisk import embedded, manifest
from safepoint.storage.local import LocalStorage
from safepoint.storage.protocol import Storage

#: Upload and download in pieces of this size (the file is never read whole into memory).
_CHUNK = 16 << 20
#: The temporary directories' prefix (in ``$TMPDIR``), followed by the pid and a dash: a
#: killed process leaves one behind at worst, which the next :func:`stage` removes.
_PREFIX = "safepoint-file-"


def record_path(name: str) -> str:
    return f"{name}/{manifest.NAME}"


def record_bytes(storage: Storage, name: str) -> bytes:
    """The record of file checkpoint ``name``: its sealed manifest, as embedded in it."""
    return storage.read_bytes(record_path(name), max_size=manifest.MAX_BYTES)


def is_file_checkpoint(storage: Storage, name: str) -> bool:
    """Whether committed name ``name`` (of a single-file suffix) holds a sealed file.

    A directory checkpoint whose name happens to end in ``.h5`` has a record without
    the single-file entry and is left to the directory code.
    """
    try:
        data = record_bytes(storage, name)
    except FileNotFoundError:
        return False
    try:
        found = manifest.parse(data, where=record_path(name))
    except CorruptCheckpointError:
        return True  # damaged: reported by whoever reads it, as for a local file
    return embedded.KEY in found.extra


# ---------------------------------------------------------------------------- writing
def stage(name: str, write: Callable[[str], None]) -> str:
    """Have ``write`` create the file in a fresh local temporary directory; returns it."""
    _sweep()
    entry = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    try:
        write(os.path.join(entry, name))
    except BaseException:
        discard(entry)
        raise
    problem = not_a_file(os.path.join(entry, name))
    if problem is not None:
        discard(entry)
        raise StorageError(
            f"The framework wrote no file for checkpoint {name!r}. Expected write_fn(path) to "
            f"create a regular file at the path it is given. Received: {problem}. Check the "
            "function passed to save_file.",
            stage="write",
        )
    return entry


def not_a_file(path: str) -> str | None:
    """What is at ``path`` if it is not a regular file (a link is never followed: sealing
    it would change a file outside the root); None for a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "nothing at that path"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return None if stat.S_ISREG(mode) else "not a regular file"


def _sweep() -> None:
    """Remove the temporary directories of this user's processes that died with one."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for item in names:
        pid = item[len(_PREFIX) :].split("-", 1)[0]
        if not item.startswith(_PREFIX) or not pid.isdigit() or _alive(int(pid)):
            continue
        path = os.path.join(base, item)
        with contextlib.suppress(OSError):
            if os.lstat(path).st_uid == os.getuid() and stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def discard(entry: str) -> None:
    shutil.rmtree(entry, ignore_errors=True)


def upload(storage: Storage, entry: str, name: str, data: bytes) -> None:
    """Upload the sealed file in ``entry`` and commit it as ``name`` with record ``data``."""
    staged = storage.stage(name)
    try:
        writer = storage.open_write(f"{staged}/{name}")
        try:
            with open(os.path.join(entry, name), "rb") as f:
                while chunk := f.read(_CHUNK):
                    writer.write([memoryview(chunk)])
            writer.close()
        except BaseException:
            writer.abort()
            raise
        storage.write_file(record_path(staged), data, stage="manifest")
        storage.commit(staged, name)
    except BaseException:
        with contextlib.suppress(Exception):  # what stays behind is gc's
            storage.discard(staged)
        raise


# ---------------------------------------------------------------------------- reading
def _download(storage: Storage, relpath: str, path: str) -> None:
    size = storage.size(relpath)
    with storage.open_read(relpath) as src, open(path, "wb") as dst:
        copied = 0
        while copied < size and (chunk := src.read(min(_CHUNK, size - copied))):
            dst.write(chunk)
            copied += len(chunk)


#: Reads of a file checkpoint that a re-save of its name raced, before giving up.
_ATTEMPTS = 3


@contextlib.contextmanager
def fetched(storage: Storage, name: str, kind: str) -> Iterator[tuple[LocalStorage, bytes]]:
    """The file of checkpoint ``name`` fetched into a private local root, and its record.

    The record and the payload come from one save (the record names its payload). The
    manifest embedded in the file must be the record byte for byte, so what was listed
    is what is read; the caller's local read then checks every checksum. A re-save of
    the name while it is fetched (the old payload deleted) starts the fetch again.
    """
    entry = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    try:
        for attempt in range(_ATTEMPTS):
            data = record_bytes(storage, name)
            try:
                _fetch(storage, name, kind, data, os.path.join(entry, name))
                break
            except (FileNotFoundError, CorruptCheckpointError):
                try:
                    now = record_bytes(storage, name)
                except FileNotFoundError:
                    raise CheckpointNotFoundError(
                        f"Checkpoint {name!r} in {storage.root} was deleted while it was "
                        "being read. Expected it to stay until read. List the root again."
                    ) from None
                if now == data or attempt + 1 == _ATTEMPTS:
                    raise  # not a re-save: the damage is real
        yield LocalStorage(entry), data
    finally:
        discard(entry)


def _fetch(storage: Storage, name: str, kind: str, record: bytes, path: str) -> None:
    try:
        _download(storage, f"{name}/{name}", path)
    except FileNotFoundError:
        if not storage.exists(record_path(name)):
            raise
        raise CorruptCheckpointError(
            f"{storage.root}/{name} is committed but its file is missing. Expected the "
            "object its record names. Received: no object. Restore an older checkpoint.",
            file=name,
            actual=None,
        ) from None
    with open(path, "rb") as f:
        try:
            inside = embedded.manifest_bytes(f, kind, name)
        except FileNotFoundError:
            inside = b""
    if inside != record:
        raise CorruptCheckpointError(
            f"{storage.root}/{name}: the manifest embedded in the file differs from the "
            "record it was committed with. Expected the same bytes. Received: "
            f"{len(inside)} embedded bytes against a {len(record)}-byte record (a damaged "
            "or replaced payload). Restore an older checkpoint.",
            file=name,
        )


__all__ = [
    "discard",
    "fetched",
    "is_file_checkpoint",
    "not_a_file",
    "record_bytes",
    "stage",
    "upload",
]
