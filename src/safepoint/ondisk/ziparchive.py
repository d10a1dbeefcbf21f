"""Reading a ``.keras`` zip without trusting it: bounded directory, bounded inflation.

:mod:`safepoint.ondisk.embedded` seals and checks ``.keras`` files with these: the
central directory's declared size is checked before ``zipfile`` parses it (a small
file can declare a million entries), and each entry is inflated in chunks only up to
the size the manifest vouches for (a zip bomb costs that much work, one chunk of
memory).
"""

from __future__ import annotations

import lzma
import os
import struct
import zipfile
import zlib
from typing import Any

from safepoint.ondisk import checksum
from safepoint.ondisk.h5tree import corrupt

#: The entry that holds safepoint's manifest inside a ``.keras`` zip.
ZIP_ENTRY = "safepoint-manifest.json"
_MAX_ZIP_DIRECTORY = 1 << 20  # a .keras holds a few entries (~100 bytes of directory each)
_CHUNK = 8 << 20


def _zip_directory_size(f: Any) -> int:
    """The central directory's size as the end records declare it (0 if none is found).

    Found as ``zipfile`` finds it (the last end-of-directory signature, then the
    zip64 record it points to), so the bound checked here is the one ``zipfile``
    then parses: it builds an object per entry, and a small file can declare a
    million entries.
    """
    fd = f.fileno()
    size = os.fstat(fd).st_size
    tail = os.pread(fd, min(size, 22 + 0xFFFF), max(0, size - 22 - 0xFFFF))
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return 0
    directory: int = struct.unpack_from("<L", tail, at + 12)[0]
    if at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":
        (where,) = struct.unpack_from("<Q", tail, at - 12)
        record = os.pread(fd, 56, where) if where < size else b""
        if len(record) == 56 and record[:4] == b"PK\x06\x06":
            directory = max(directory, struct.unpack_from("<Q", record, 40)[0])
    return directory


#: What ``zipfile`` raises for a damaged or unreadable entry: an encrypted flag
#: (RuntimeError), an unknown compression method (NotImplementedError), a broken
#: compressed stream (zlib.error, LZMAError, OSError for bzip2) as well as its own.
ZIP_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    NotImplementedError,
    zlib.error,
    lzma.LZMAError,
)


def open_zip(source: Any, name: str) -> zipfile.ZipFile:
    if hasattr(source, "fileno"):
        directory = _zip_directory_size(source)
        if directory > _MAX_ZIP_DIRECTORY:
            raise corrupt(
                name,
                "the zip directory is too large",
                expected=_MAX_ZIP_DIRECTORY,
                actual=directory,
            )
    try:
        return zipfile.ZipFile(source)
    except ZIP_ERRORS as exc:
        raise corrupt(name, "not a readable zip file", actual=str(exc)[:120]) from None


def zip_entries(
    z: zipfile.ZipFile,
    name: str,
    recorded: dict[str, Any] | None,
    keep: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Each entry's size and digest (ours excluded), bounded by ``recorded`` sizes.

    Entries are inflated in chunks and stop at the size the manifest vouches for, so
    a zip bomb costs at most that much work and one chunk of memory. The entries
    named in ``keep`` are also kept there, as the very bytes hashed.
    """
    out: dict[str, Any] = {}
    for info in z.infolist():
        if info.filename == ZIP_ENTRY:
            continue
        limit = None
        if recorded is not None:
            if info.filename not in recorded:
                raise corrupt(name, f"unexpected zip entry {info.filename!r}")
            limit = int(recorded[info.filename]["size"])
        hasher = checksum.Hasher()
        size = 0
        chunks: list[bytes] | None = [] if keep is not None and info.filename in keep else None
        try:
            with z.open(info) as f:
                while chunk := f.read(_CHUNK if limit is None else min(_CHUNK, limit - size + 1)):
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise corrupt(name, f"zip entry {info.filename!r} grew", expected=limit)
                    hasher.update(chunk)
                    if chunks is not None:
                        chunks.append(chunk)
        except ZIP_ERRORS as exc:
            raise corrupt(
                name, f"zip entry {info.filename!r} is unreadable", actual=str(exc)
            ) from None
        out[info.filename] = {"size": size, checksum.ALGORITHM: hasher.hexdigest()}
        if keep is not None and chunks is not None:
            keep[info.filename] = b"".join(chunks)
    if recorded is not None:
        missing = sorted(set(recorded) - set(out))
        if missing:
            raise corrupt(name, "zip entries are missing", expected=missing, actual=sorted(out))
        for entry, info in recorded.items():
            where = f"{name}:{entry}"
            checksum.check_size(where, expected=int(info["size"]), actual=out[entry]["size"])
            checksum.check(
                where, expected=info[checksum.ALGORITHM], actual=out[entry][checksum.ALGORITHM]
            )
    return out


__all__ = ["ZIP_ENTRY", "ZIP_ERRORS", "open_zip", "zip_entries"]
