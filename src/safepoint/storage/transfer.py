"""Copying one committed local checkpoint into a bucket (the local-first uploader's step).

The copy reads the checkpoint through its directory opened once (a re-save of the name
meanwhile cannot mix two versions: a file already deleted fails the copy, which the
uploader retries on its next pass), hashes each payload file while it streams it to
the bucket, and commits with the bucket's own protocol: payload first, the record
last. A local file that no longer matches its manifest's checksum is not uploaded.
"""

from __future__ import annotations

from safepoint.errors import CorruptCheckpointError, StorageError
from safepoint.ondisk import checksum, manifest
from safepoint.ondisk.embedded import KEY
from safepoint.storage import held
from safepoint.storage.local import LocalStorage
from safepoint.storage.protocol import Storage

_CHUNK = 16 << 20


def records(local: LocalStorage) -> dict[str, bytes]:
    """The record (manifest bytes) of every committed checkpoint directory in ``local``."""
    found = {}
    for name in local.list_names():
        if name.startswith(".") or not local.is_dir(name):
            continue  # staging and trash entries, the run log, the ledger
        try:
            found[name] = local.read_bytes(f"{name}/{manifest.NAME}", max_size=manifest.MAX_BYTES)
        except (FileNotFoundError, StorageError):
            continue  # not a committed checkpoint (or one retention is removing)
    return found


def record(storage: Storage, name: str) -> bytes | None:
    """The record of checkpoint ``name`` in ``storage``; None when it has none."""
    try:
        return storage.read_bytes(f"{name}/{manifest.NAME}", max_size=manifest.MAX_BYTES)
    except FileNotFoundError:
        return None


def copy_checkpoint(local: LocalStorage, remote: Storage, name: str, record: bytes) -> None:
    """Copy committed checkpoint ``name`` to the bucket, one version, each file hashed."""
    view = held.hold(local, name)
    try:
        data = view.read_bytes(f"{name}/{manifest.NAME}", max_size=manifest.MAX_BYTES)
        if data != record:
            raise FileNotFoundError(name)  # re-saved since listed: the next pass
        found = manifest.parse(data, where=f"{name}/{manifest.NAME}")
        files = {f: info.get(checksum.ALGORITHM) for f, info in found.files.items()}
        if KEY in found.extra:
            files.setdefault(name, None)  # a framework file: sealed, checked by readers
        staged = remote.stage(name)
        try:
            for fname, expected in files.items():
                _copy(local, remote, view, f"{name}/{fname}", f"{staged}/{fname}", expected)
            remote.write_file(f"{staged}/{manifest.NAME}", data, stage="manifest")
            remote.commit(staged, name)
        except BaseException:
            remote.discard(staged)
            raise
    finally:
        held.release(view)


def _copy(
    local: LocalStorage,
    remote: Storage,
    view: LocalStorage,
    source: str,
    target: str,
    expected: str | None,
) -> None:
    hasher = checksum.Hasher()
    writer = remote.open_write(target)
    try:
        with view.open_read(source) as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
                writer.write([memoryview(chunk)])
        if expected is not None and hasher.hexdigest() != expected:
            raise CorruptCheckpointError(
                f"{local.describe(source)} does not match its manifest's checksum; "
                "it was not uploaded. Expected the bytes that were committed. Received: "
                "a damaged local file. Check the local disk.",
                file=source,
                expected=expected,
                actual=hasher.hexdigest(),
            )
        writer.close()
    except BaseException:
        writer.abort()
        raise


__all__ = ["copy_checkpoint", "record", "records"]
