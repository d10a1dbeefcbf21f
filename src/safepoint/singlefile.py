"""Single-file checkpoints: HDF5 (``.h5``, ``.hdf5``, ``.weights.h5``) and ``.keras`` zips.

Frameworks read their own files (``model.load_weights("weights.best.hdf5")``), so the
Keras drop-in writes exactly those files; this module gives them what a checkpoint
directory has. The commit protocol is the directory one, for one file:

1. stage: the framework writes a hidden file ``.sp.tmp-<random><suffix>`` in the
   destination directory (same file system, so the rename below is atomic);
2. seal: the content is hashed and safepoint's manifest is embedded in the file (a
   ``safepoint_manifest`` root attribute in HDF5, a ``safepoint-manifest.json`` entry
   in the zip); then the file is ``fsync``-ed;
3. commit: ``rename`` over the final name, then ``fsync`` the directory.

A kill at any moment leaves the old file or the new one, never a truncated one, plus
at worst a hidden staging file that :func:`cleanup_stale` removes.

A manifest cannot hold the checksum of the file that contains it, so the embedded
manifest records a digest of the *content* instead: for HDF5 every dataset (path,
dtype, shape, bytes) and every attribute but ours, in sorted order; for zips every
entry's size and digest. The manifest checksums itself, like every manifest.

The manager lists these files beside checkpoint directories (``is_single_file``),
and ``reader`` dispatches here to read, verify and load them. Nothing is unpickled;
HDF5 links, external and virtual storage are refused, and sizes are checked before
anything is read.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import stat
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import checksum, manifest, runlog
from .checkpoint import Checkpoint
from .errors import CorruptCheckpointError, IncompleteCheckpointError, StorageError
from .manifest import Manifest
from .storage import TMP_MARK, Storage, check_name, translate

SUFFIXES = (".weights.h5", ".keras", ".hdf5", ".h5")
KEY = "single_file"
ATTR = "safepoint_manifest"
ZIP_ENTRY = "safepoint-manifest.json"
WEIGHTS_ENTRY = "model.weights.h5"
_STAGED = re.compile(r"^\.sp\.tmp-[0-9a-f]{8}(\.keras|\.weights\.h5|\.hdf5|\.h5)$")
_MAX_DEPTH = 64
_NUMERIC = "biufcS"
_CHUNK = 8 << 20

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
    """True when ``name`` in ``storage`` is a regular file with a single-file suffix."""
    if container(name) is None:
        return False
    path = storage.local_path(name)
    if path is None:
        return False
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _path(storage: Storage, name: str) -> str:
    path = storage.local_path(name)
    if path is None:
        raise StorageError(
            f"Single-file checkpoints need a local file system. Received: root={storage.root!r}.",
            stage="read",
        )
    return path


def _corrupt(name: str, why: str, *, expected: Any = None, actual: Any = None) -> Exception:
    return CorruptCheckpointError(
        f"Checkpoint file {name} is invalid: {why}. Expected {expected!r}. Received: "
        f"{actual!r}. It was damaged after it was written; restore another checkpoint "
        "(restore('latest') skips it).",
        file=name,
        expected=expected,
        actual=actual,
    )


def _open_h5(source: Any, name: str, mode: str = "r") -> Any:
    import h5py

    try:
        return h5py.File(source, mode)
    except (OSError, ValueError) as exc:
        raise _corrupt(name, "not a readable HDF5 file", actual=str(exc)[:120]) from None


def _open_zip(path: str, name: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _corrupt(name, "not a readable zip file", actual=str(exc)[:120]) from None


# ---------------------------------------------------------------------------- content
def _attr_bytes(value: Any) -> bytes:
    """Canonical bytes of an attribute value (vlen strings as their UTF-8 text)."""
    arr = np.asarray(value)
    if arr.dtype.kind == "O" or arr.dtype.kind == "U":
        items = [v.encode() if isinstance(v, str) else bytes(v) for v in arr.reshape(-1)]
        return b"\x00".join(items) + f"|{arr.shape}".encode()
    return arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()


def _walk(group: Any, name: str, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """Every object below ``group`` as ``(path, object)``, sorted, links refused."""
    import h5py

    if depth > _MAX_DEPTH:
        raise _corrupt(name, "HDF5 groups nest too deep", expected=f"<= {_MAX_DEPTH} levels")
    for key in sorted(group.keys()):
        path = f"{prefix}{key}"
        link = group.get(key, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise _corrupt(name, f"{path!r} is a soft or external link", expected="hard links")
        obj = group[key]
        yield path, obj
        if isinstance(obj, h5py.Group):
            yield from _walk(obj, name, f"{path}/", depth + 1)


def _dataset_nbytes(dset: Any, name: str, path: str) -> int:
    if dset.dtype.kind not in _NUMERIC or dset.dtype.fields:
        raise _corrupt(name, f"dataset {path!r} has a non-numeric dtype", actual=str(dset.dtype))
    if dset.external is not None or dset.is_virtual:
        raise _corrupt(name, f"dataset {path!r} uses external or virtual storage")
    nbytes = int(np.prod(dset.shape, dtype=np.int64)) * dset.dtype.itemsize
    if dset.chunks is None and nbytes and dset.id.get_storage_size() != nbytes:
        raise _corrupt(
            name,
            f"dataset {path!r} stores a different number of bytes than it declares",
            expected=nbytes,
            actual=dset.id.get_storage_size(),
        )
    return nbytes


def _h5_content(
    h5: Any, name: str, *, budget: int | None = None, arrays: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Digest, dataset count and byte total of an HDF5 file's content (ours excluded).

    ``budget`` caps the bytes read (the manifest's total, when verifying), checked
    before each dataset is allocated; ``arrays`` collects the datasets as a tree.
    """
    import h5py

    hasher = checksum.Hasher()
    total = count = 0

    def attrs(path: str, obj: Any) -> None:
        for key in sorted(obj.attrs.keys()):
            if path == "" and key == ATTR:
                continue
            hasher.update(f"@{path}:{key}=".encode())
            hasher.update(_attr_bytes(obj.attrs[key]))

    attrs("", h5)
    for path, obj in _walk(h5, name):
        attrs(path, obj)
        if not isinstance(obj, h5py.Dataset):
            hasher.update(f"#group {path}".encode())
            continue
        nbytes = _dataset_nbytes(obj, name, path)
        total += nbytes
        count += 1
        if budget is not None and total > budget:
            raise _corrupt(name, "datasets declare more bytes than recorded", expected=budget)
        data = np.empty(obj.shape, dtype=obj.dtype)
        if nbytes:
            obj.read_direct(data)
        hasher.update(f"#dataset {path} {obj.dtype.str} {list(obj.shape)}".encode())
        hasher.update(memoryview(np.ascontiguousarray(data)).cast("B"))
        if arrays is not None:
            node = arrays
            *parents, leaf = path.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = data[()] if data.shape == () else data
    return {"digest": hasher.hexdigest(), "datasets": count, "bytes": total}


def _zip_entries(z: zipfile.ZipFile, name: str, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """Each entry's size and digest (ours excluded), bounded by ``recorded`` sizes."""
    out: dict[str, Any] = {}
    for info in z.infolist():
        if info.filename == ZIP_ENTRY:
            continue
        limit = None
        if recorded is not None:
            if info.filename not in recorded:
                raise _corrupt(name, f"unexpected zip entry {info.filename!r}")
            limit = int(recorded[info.filename]["size"])
            if info.file_size != limit:
                raise _corrupt(
                    name, f"zip entry {info.filename!r} size", expected=limit, actual=info.file_size
                )
        hasher = checksum.Hasher()
        size = 0
        try:
            with z.open(info) as f:
                while chunk := f.read(_CHUNK):
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise _corrupt(name, f"zip entry {info.filename!r} grew", expected=limit)
                    hasher.update(chunk)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise _corrupt(
                name, f"zip entry {info.filename!r} is unreadable", actual=str(exc)
            ) from None
        out[info.filename] = {"size": size, checksum.ALGORITHM: hasher.hexdigest()}
    if recorded is not None:
        missing = sorted(set(recorded) - set(out))
        if missing:
            raise _corrupt(name, "zip entries are missing", expected=missing, actual=sorted(out))
        for entry, info in recorded.items():
            checksum.check(
                f"{name}:{entry}",
                expected=info[checksum.ALGORITHM],
                actual=out[entry][checksum.ALGORITHM],
            )
    return out


# ---------------------------------------------------------------------------- reading
def manifest_bytes(storage: Storage, name: str) -> bytes:
    """The embedded manifest of ``name``; ``FileNotFoundError`` when it has none."""
    path = _path(storage, name)
    info = os.lstat(path)
    ident = (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    if ident in _seen:
        return _seen[ident]
    if container(name) == "zip":
        with _open_zip(path, name) as z:
            try:
                entry = z.getinfo(ZIP_ENTRY)
            except KeyError:
                raise FileNotFoundError(f"{path} has no embedded safepoint manifest") from None
            if entry.file_size > manifest.MAX_BYTES:
                raise _corrupt(name, "embedded manifest too large", actual=entry.file_size)
            try:
                data = z.read(entry)
            except (zipfile.BadZipFile, OSError) as exc:
                raise _corrupt(name, "embedded manifest unreadable", actual=str(exc)) from None
    else:
        with _open_h5(path, name) as h5:
            if ATTR not in h5.attrs:
                raise FileNotFoundError(f"{path} has no embedded safepoint manifest")
            value = np.asarray(h5.attrs[ATTR])
            if value.dtype != np.uint8 or value.ndim != 1 or value.size > manifest.MAX_BYTES:
                raise _corrupt(name, "embedded manifest malformed", actual=str(value.dtype))
            data = value.tobytes()
    if len(_seen) > 4096:
        _seen.clear()
    _seen[ident] = data
    return data


def read_manifest(storage: Storage, name: str) -> Manifest:
    """The validated manifest embedded in checkpoint file ``name``."""
    try:
        data = manifest_bytes(storage, name)
    except FileNotFoundError:
        raise IncompleteCheckpointError(
            f"{storage.root}/{name} has no embedded safepoint manifest: it was not written "
            "by safepoint. Expected a file saved by safepoint.keras. Load it with the "
            "framework that wrote it."
        ) from None
    where = f"{name}[{ATTR if container(name) == 'hdf5' else ZIP_ENTRY}]"
    found = manifest.parse(data, where=where)
    record = found.extra.get(KEY)
    if not isinstance(record, dict) or record.get("container") != container(name):
        raise _corrupt(name, "the embedded manifest describes another kind of file", actual=record)
    return found


def _check_h5(name: str, record: dict[str, Any], content: dict[str, Any]) -> None:
    if content["datasets"] != record.get("datasets") or content["bytes"] != record.get("bytes"):
        raise _corrupt(
            name,
            "dataset count or size differs from the manifest",
            expected=(record.get("datasets"), record.get("bytes")),
            actual=(content["datasets"], content["bytes"]),
        )
    checksum.check(name, expected=str(record.get("digest")), actual=content["digest"])


def read_state(storage: Storage, name: str, found: Manifest) -> dict[str, Any]:
    """Verify checkpoint file ``name`` and return its weights as a tree of numpy arrays."""
    path = _path(storage, name)
    record = found.extra[KEY]
    arrays: dict[str, Any] = {}
    if record["container"] == "zip":
        with _open_zip(path, name) as z:
            _zip_entries(z, name, record.get("entries", {}))
            if WEIGHTS_ENTRY in z.namelist():
                with _open_h5(io.BytesIO(z.read(WEIGHTS_ENTRY)), name) as h5:
                    _h5_content(h5, name, arrays=arrays)
        return arrays
    with _open_h5(path, name) as h5:
        content = _h5_content(h5, name, budget=int(record.get("bytes", 0)), arrays=arrays)
    _check_h5(name, record, content)
    return arrays


def verify(storage: Storage, name: str) -> Manifest:
    """Check the embedded manifest and the content digest of checkpoint file ``name``."""
    found = read_manifest(storage, name)
    read_state(storage, name, found)
    return found


# ---------------------------------------------------------------------------- writing
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
) -> Manifest:
    """Write checkpoint file ``name`` with ``write(staged_path)`` and commit it atomically.

    ``write`` must create the file at the path it is given (a hidden name in the same
    directory, with the final suffix, as framework savers check suffixes).
    """
    check_name(name)
    kind = container(name)
    if kind is None:
        raise ValueError(f"{name!r} has no single-file suffix")
    fault = getattr(storage, "_fault", lambda stage, target: None)
    root = storage.root
    staged = os.path.join(root, f".sp{TMP_MARK}{secrets.token_hex(4)}{suffix(name)}")
    final = os.path.join(root, name)
    try:
        with translate("write", staged):
            os.makedirs(root, exist_ok=True)
            fault("write", name)
            write(staged)
        body = Manifest(
            name=name,
            seq=seq,
            step=step,
            epoch=epoch,
            created=manifest.now(),
            metrics=metrics,
            tree=None,
            tensors={},
            files={},
            payload="hdf5",
            extra={},
        )
        with translate("manifest", staged):
            fault("manifest", name)
            if kind == "zip":
                with zipfile.ZipFile(staged, "a") as z:
                    entries = _zip_entries(z, name, None)
                    extra = {"container": kind, "layout": layout, "entries": entries}
                    body = _with_extra(body, extra)
                    z.writestr(ZIP_ENTRY, body.to_bytes())
            else:
                with _open_h5(staged, name, "r+") as h5:
                    extra = {"container": kind, "layout": layout, **_h5_content(h5, name)}
                    body = _with_extra(body, extra)
                    h5.attrs.create(ATTR, np.frombuffer(body.to_bytes(), dtype=np.uint8))
        # The bytes must be durable before the name points at them, and the directory
        # entry durable before the save returns: a power loss after a returned save
        # must find the new file, and one before it the old file.
        with translate("fsync", staged):
            fault("fsync", name)
            _fsync(staged)
        with translate("rename", final):
            fault("rename", name)
            os.replace(staged, final)
        with translate("dir-fsync", root):
            fault("dir-fsync", name)
            _fsync(root)
    except BaseException:
        if os.path.lexists(staged):
            os.unlink(staged)
        raise
    return body


def _with_extra(body: Manifest, extra: dict[str, Any]) -> Manifest:
    from dataclasses import replace

    return replace(body, extra={KEY: extra})


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
    """Commit a checkpoint file through ``manager``: ordered, logged, retention applied.

    The file's ``seq`` continues the manager's listing, so files and checkpoint
    directories in one root share one order, and ``Keep`` prunes both alike.
    """
    from .manager import _metrics_arg

    storage = manager.storage
    metrics = _metrics_arg(metrics)
    storage.lock()
    seq = max((c.seq for c in manager.checkpoints()), default=0) + 1
    started = time.perf_counter()
    found = commit(
        storage, name, write, seq=seq, step=step, epoch=epoch, metrics=metrics, layout=layout
    )
    size = os.path.getsize(os.path.join(storage.root, name))
    runlog.record(
        storage,
        "save",
        name=name,
        seq=seq,
        step=step,
        epoch=epoch,
        metrics=metrics,
        bytes=size,
        seconds=round(time.perf_counter() - started, 6),
    )
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


def cleanup_stale(directory: str) -> list[str]:
    """Remove staging files that a killed writer left in ``directory``; return their names.

    Only names this module creates (``.sp.tmp-<8 hex><suffix>``) are touched, so a
    user's own files in the same directory are never at risk.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for entry in names:
        if _STAGED.match(entry):
            path = os.path.join(directory, entry)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)
                removed.append(entry)
    return removed
