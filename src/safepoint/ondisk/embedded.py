"""Manifests embedded in the files frameworks read: HDF5 and ``.keras`` zips.

:mod:`safepoint.catalog.singlefile` commits such files; this module seals a written file
(puts safepoint's manifest inside it), reads the manifest back, checks the file
against it, and reads its weights without pickle.

HDF5 (``.h5``, ``.hdf5``, ``.weights.h5``): the manifest is the root attribute
``safepoint_manifest`` (a uint8 array). A manifest cannot hold the checksum of the
file that contains it, so the checksum covers the whole file with the attribute's
bytes counted as zeros: the attribute is first created with a random placeholder of
the final length, the placeholder is found in the file (once, or the seal fails),
the file is hashed with that region zeroed, and the manifest (with the digest, the
region's offset and the file size) is written over the placeholder in place. HDF5
stores a compact attribute's value verbatim and, in the files Keras writes (object
header version 1), without a metadata checksum, so the file stays valid; the seal
reads the attribute back through h5py to prove it. Reading and verifying need no
HDF5 at all: the manifest's JSON is found by its fixed opening bytes, and the file's
checksum is checked before h5py parses anything, so a damaged or hostile file never
reaches the HDF5 library. Every byte of the file is covered.

Zip (``.keras``): the manifest is the entry ``safepoint-manifest.json`` and records
every other entry's size and checksum: all that Keras reads. The zip's own directory
records (timestamps, offsets) are checked only by ``zipfile`` as it reads.
"""

from __future__ import annotations

import io
import mmap
import os
import secrets
import zipfile
from dataclasses import replace
from typing import Any, BinaryIO

import numpy as np

from safepoint.errors import StorageError
from safepoint.ondisk import checksum, h5tree, manifest
from safepoint.ondisk.h5tree import corrupt
from safepoint.ondisk.manifest import Manifest
from safepoint.ondisk.ziparchive import ZIP_ENTRY, ZIP_ERRORS, open_zip, zip_entries

ATTR = "safepoint_manifest"
WEIGHTS_ENTRY = "model.weights.h5"
KEY = "single_file"
_BIG = 10**15  # wider than any offset or size a seal records
_PREFIX = b'{\n "format": "safepoint"'  # how Manifest.to_bytes() begins
_proven: set[str] = set()


def unsealed(name: str, why: str, *, expected: str, actual: str) -> StorageError:
    """The error for a file that could not be sealed: the save fails, nothing is committed."""
    return StorageError(
        f"Sealing checkpoint file {name} failed: {why}. Expected {expected}. Received: "
        f"{actual}. The file was not committed and earlier checkpoints are intact; save "
        "again, and report this to safepoint if it repeats.",
        stage="manifest",
    )


def _open_h5(source: Any, name: str, mode: str = "r") -> Any:
    import h5py

    try:
        return h5py.File(source, mode)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise corrupt(name, "not a readable HDF5 file", actual=str(exc)[:120]) from None


# ---------------------------------------------------------------------------- HDF5
def _digest_zeroed(view: Any, offset: int, length: int) -> str:
    """xxh3 of ``view`` with ``[offset, offset + length)`` counted as zero bytes."""
    hasher = checksum.Hasher()
    hasher.update(view[:offset])
    hasher.update(bytes(length))
    hasher.update(view[offset + length :])
    return hasher.hexdigest()


def _seal_h5(path: str, name: str, body: Manifest, extra: dict[str, Any]) -> tuple[Manifest, bytes]:
    probe = replace(body, extra={**body.extra, KEY: {**extra, "digest": "0" * 16, "size": _BIG,
                                       "offset": _BIG, "length": _BIG}})  # fmt: skip
    length = len(probe.to_bytes()) + 16
    marker = secrets.token_bytes(32)
    placeholder = (marker * (length // 32 + 1))[:length]
    with _open_h5(path, name, "r+") as h5:
        h5.attrs.create(ATTR, np.frombuffer(placeholder, dtype=np.uint8))
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            offset = view.find(placeholder)
            if offset < 0 or view.find(marker, offset + length) >= 0:
                found = "none" if offset < 0 else "more than one"
                raise unsealed(
                    name,
                    "the manifest attribute could not be located in the written file",
                    expected="exactly one copy of the attribute's placeholder bytes",
                    actual=found,
                )
            record = {**extra, "size": len(view), "offset": offset, "length": length}
            record["digest"] = _digest_zeroed(memoryview(view), offset, length)
        sealed = replace(body, extra={**body.extra, KEY: record})
        data = sealed.to_bytes()
        padded = data + b" " * (length - len(data))
        # Durability comes from the caller's fsync of the whole file.
        os.pwrite(f.fileno(), padded, offset)
    if not data.startswith(_PREFIX):
        raise unsealed(
            name,
            "the manifest does not start as expected",
            expected=repr(_PREFIX),
            actual=repr(data[: len(_PREFIX)]),
        )
    if extra["layout"] not in _proven:
        # That HDF5 keeps the attribute verbatim is a property of how a layout's files
        # are written: prove it once per layout and process, through h5py.
        if read_h5_manifest(path, name) != padded:
            raise unsealed(
                name,
                "HDF5 did not store the manifest attribute verbatim",
                expected=f"the {len(padded)} bytes written",
                actual="different bytes read back through h5py",
            )
        _proven.add(extra["layout"])
    return sealed, data


def _find_h5_manifest(view: Any, name: str) -> tuple[int, bytes]:
    """Offset and bytes of the sealed manifest, found without parsing any HDF5.

    A sealed attribute holds the manifest's JSON, which always begins with
    ``_PREFIX`` and ends with the first unindented closing brace.
    """
    start = view.find(_PREFIX)
    if start < 0:
        if view.find(ATTR.encode()) >= 0:
            # The attribute is there but its manifest is not: a damaged checkpoint of
            # ours, to be reported, never a file someone else wrote (that is ignored).
            raise corrupt(name, "the embedded manifest is damaged", expected=_PREFIX.decode())
        raise FileNotFoundError(f"{name} has no embedded safepoint manifest")
    end = view.find(b"\n}\n", start)
    if end < 0 or end + 3 - start > manifest.MAX_BYTES:
        raise corrupt(name, "the embedded manifest has no end", expected="a JSON object")
    return start, bytes(view[start : end + 3])


def read_h5_manifest(path: str, name: str) -> bytes:
    """The attribute's bytes as h5py reads them (``FileNotFoundError`` when absent)."""
    with _open_h5(path, name) as h5:
        if ATTR not in h5.attrs:
            raise FileNotFoundError(f"{path} has no embedded safepoint manifest")
        value = np.asarray(h5.attrs[ATTR])
    if value.dtype != np.uint8 or value.ndim != 1 or value.size > manifest.MAX_BYTES:
        raise corrupt(name, "embedded manifest malformed", actual=str(value.dtype))
    return value.tobytes()


def _mapped(f: BinaryIO) -> Any:
    """The whole file ``f`` mapped read-only (the file itself, not whatever its name is now)."""
    if os.fstat(f.fileno()).st_size == 0:
        return b""
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _check_h5(f: BinaryIO, name: str, record: dict[str, Any]) -> None:
    """Checksum the raw bytes; HDF5 parses nothing of a file that fails this."""
    offset, length, size = (int(record.get(k, -1)) for k in ("offset", "length", "size"))
    view = _mapped(f)
    try:
        checksum.check_size(name, expected=size, actual=len(view))
        if not 0 <= offset <= offset + length <= size or size == 0:
            raise corrupt(name, "manifest region outside the file", actual=(offset, length))
        found, data = _find_h5_manifest(view, name)
        # The region is the manifest padded with spaces: any other byte there is damage
        # the zeroed checksum would not see.
        if found != offset or view[offset : offset + length] != data.ljust(length, b" "):
            raise corrupt(name, "the manifest region was altered", expected=offset, actual=found)
        digest = _digest_zeroed(memoryview(view), offset, length)
    finally:
        if isinstance(view, mmap.mmap):
            view.close()
    checksum.check(name, expected=str(record.get("digest")), actual=digest)


# ---------------------------------------------------------------------------- entry points
def seal(path: str, kind: str, name: str, body: Manifest, layout: str) -> tuple[Manifest, bytes]:
    """Embed ``body`` (given its record) in the written file at ``path``.

    Returns the sealed manifest and its bytes, as :func:`manifest_bytes` reads them.
    """
    extra = {"container": kind, "layout": layout}
    if kind == "hdf5":
        return _seal_h5(path, name, body, extra)
    with zipfile.ZipFile(path, "a") as z:
        record = {**extra, "entries": zip_entries(z, name, None)}
        sealed = replace(body, extra={**body.extra, KEY: record})
        data = sealed.to_bytes()
        z.writestr(ZIP_ENTRY, data)
    return sealed, data


def manifest_bytes(f: BinaryIO, kind: str, name: str) -> bytes:
    """The embedded manifest's bytes; ``FileNotFoundError`` when the file has none."""
    if kind == "hdf5":
        view = _mapped(f)
        try:
            return _find_h5_manifest(view, name)[1]
        finally:
            if isinstance(view, mmap.mmap):
                view.close()
    with open_zip(f, name) as z:
        try:
            entry = z.getinfo(ZIP_ENTRY)
        except KeyError:
            raise FileNotFoundError(f"{name} has no embedded safepoint manifest") from None
        if entry.file_size > manifest.MAX_BYTES:
            raise corrupt(name, "embedded manifest too large", actual=entry.file_size)
        try:
            return z.read(entry)  # zipfile inflates no more than the declared file_size
        except ZIP_ERRORS as exc:
            raise corrupt(name, "embedded manifest unreadable", actual=str(exc)) from None


def check_record(name: str, record: Any, kind: str | None) -> None:
    """Refuse a manifest whose single-file record is not one this module writes."""
    fields = ("offset", "length", "size") if kind == "hdf5" else ()
    ok = (
        isinstance(record, dict)
        and record.get("container") == kind
        and all(
            isinstance(record.get(f), int)
            and not isinstance(record.get(f), bool)
            and record[f] >= 0
            for f in fields
        )
        and (kind != "hdf5" or isinstance(record.get("digest"), str))
        and (kind != "zip" or _entries_ok(record.get("entries")))
    )
    if not ok:
        raise corrupt(
            name, f"the manifest's record of this {kind} file is malformed", actual=record
        )


def _entries_ok(entries: Any) -> bool:
    """A zip record: each entry's size (what bounds its inflation) and digest."""
    return isinstance(entries, dict) and all(
        isinstance(info, dict)
        and isinstance(info.get("size"), int)
        and not isinstance(info.get("size"), bool)
        and info["size"] >= 0
        and isinstance(info.get(checksum.ALGORITHM), str)
        for info in entries.values()
    )


def check(f: BinaryIO, name: str, record: dict[str, Any]) -> None:
    """Verify the open file ``f`` against its manifest's record."""
    if record["container"] == "hdf5":
        _check_h5(f, name, record)
        return
    with open_zip(f, name) as z:
        zip_entries(z, name, record.get("entries", {}))


def arrays(f: BinaryIO, name: str, record: dict[str, Any]) -> dict[str, Any]:
    """Verify the open file ``f``, then read its weights as a nested dict of numpy arrays.

    Everything is read through ``f``: a file re-committed under the same name
    meanwhile (a new inode) does not mix into this one.
    """
    if record["container"] == "hdf5":
        _check_h5(f, name, record)
        f.seek(0)
        with _open_h5(f, name) as h5:
            return h5tree.arrays(h5, name, os.fstat(f.fileno()).st_size)
    kept: dict[str, bytes] = {WEIGHTS_ENTRY: b""}
    with open_zip(f, name) as z:
        has_weights = WEIGHTS_ENTRY in z.namelist()
        zip_entries(z, name, record.get("entries", {}), keep=kept)
    if not has_weights:
        return {}
    data = kept[WEIGHTS_ENTRY]  # the bytes whose size and checksum were verified
    with _open_h5(io.BytesIO(data), name) as h5:
        return h5tree.arrays(h5, name, len(data))


__all__ = [
    "ATTR",
    "KEY",
    "WEIGHTS_ENTRY",
    "ZIP_ENTRY",
    "arrays",
    "check",
    "check_record",
    "manifest_bytes",
    "read_h5_manifest",
    "seal",
    "unsealed",
]
