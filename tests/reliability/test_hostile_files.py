"""Hostile files in a checkpoint root (issue 10, "Hostile files").

Each one is built for real (``os.mkfifo``, ``os.symlink``, h5py, ``zipfile``) next
to an older good checkpoint. Each must be refused with a documented error, within a
time bound (every read runs in a thread that must finish: a regression fails rather
than hangs), without unbounded memory, and ``restore('latest')`` must fall back to
the older good checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import struct
import threading
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint import cli
from safepoint.errors import CorruptCheckpointError
from safepoint.ondisk import checksum
from safepoint_testing import read_manifest, write_manifest

OLD, NEW = "step-00000001", "step-00000002"
LIMIT = 8.0  # seconds any single read may take


def bounded(fn: Callable[[], Any], *, fifos: tuple[Path, ...] = (), seconds: float = LIMIT) -> Any:
    """``fn()`` in a thread that must finish within ``seconds``; its result or error."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:  # let an open() that waits for a writer return
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"the read did not finish within {seconds} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def good_root(tmp_path: Path) -> Path:
    """A root with two good checkpoints, OLD (step 1) and NEW (step 2)."""
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    mgr.save({"w": np.arange(16.0), "b": np.ones(4, np.float32)}, step=1)
    mgr.save({"w": np.arange(16.0) + 1, "b": np.ones(4, np.float32)}, step=2)
    mgr.close()
    return root


def falls_back(
    root: Path,
    name: str,
    *,
    fifos: tuple[Path, ...] = (),
    listed: bool = False,
    checksums_hold: bool = False,
) -> CorruptCheckpointError:
    """Assert that ``name`` is refused as corrupt and ``latest`` is the older one.

    ``listed``: the damage is past the manifest, so ``name`` is still listed.
    ``checksums_hold``: the files match a re-signed manifest, so ``verify()`` (sizes
    and checksums) passes and only reading them finds the damage.
    """
    mgr = safepoint.CheckpointManager(root)
    got = bounded(lambda: mgr.restore(), fifos=fifos)
    assert got is not None and got.name == OLD and got.step == 1
    np.testing.assert_array_equal(got.state["w"], np.arange(16.0))
    with pytest.raises(CorruptCheckpointError) as info:
        bounded(lambda: mgr.restore(checkpoint=name), fifos=fifos)
    expected = [OLD, name] if listed else [OLD]
    assert [c.name for c in bounded(mgr.checkpoints, fifos=fifos)] == expected
    for v in bounded(mgr.verify, fifos=fifos):
        assert v.ok == (v.name == OLD or checksums_hold), v
        if not v.ok:
            assert isinstance(v.error, CorruptCheckpointError), v
    return info.value


# ---------------------------------------------------------------------------- FIFOs
@pytest.mark.parametrize("where", ["manifest.json", "model-00000.safetensors"])
def test_fifo_where_a_manifest_or_payload_belongs(tmp_path: Path, where: str) -> None:
    root = good_root(tmp_path)
    fifo = root / NEW / where
    fifo.unlink()
    os.mkfifo(fifo)
    error = falls_back(root, NEW, fifos=(fifo,), listed=where != "manifest.json")
    assert "FIFO" in str(error) and error.file == f"{NEW}/{where}"
    with pytest.raises(CorruptCheckpointError):
        bounded(lambda: safepoint.load(root / NEW), fifos=(fifo,))
    code = bounded(lambda: cli.main(["verify", str(root)]), fifos=(fifo,))
    assert code == CorruptCheckpointError.exit_code


@pytest.mark.parametrize("name", [NEW, "weights.best.h5"])
def test_fifo_where_a_checkpoint_belongs(tmp_path: Path, name: str) -> None:
    root = good_root(tmp_path)
    shutil.rmtree(root / NEW)
    fifo = root / name
    os.mkfifo(fifo)
    mgr = safepoint.CheckpointManager(root)
    got = bounded(lambda: mgr.restore(), fifos=(fifo,))
    assert got is not None and got.name == OLD
    with pytest.raises(CorruptCheckpointError, match="FIFO"):
        bounded(lambda: mgr.restore(checkpoint=name), fifos=(fifo,))
    with pytest.raises(CorruptCheckpointError, match="FIFO"):
        bounded(lambda: safepoint.load(fifo), fifos=(fifo,))
    assert bounded(lambda: cli.main(["verify", str(root)]), fifos=(fifo,)) == 0  # not listed


# ---------------------------------------------------------------------------- links
def test_checkpoint_dir_and_manifest_links_out_of_the_root(tmp_path: Path) -> None:
    root = good_root(tmp_path)
    outside = tmp_path / "outside"
    shutil.move(root / NEW, outside)
    os.symlink(outside, root / NEW)  # a whole (valid) checkpoint, outside the root
    falls_back(root, NEW)
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        safepoint.load(root / NEW)

    os.unlink(root / NEW)
    shutil.copytree(outside, root / NEW)
    (root / NEW / "manifest.json").unlink()
    os.symlink("/etc/passwd", root / NEW / "manifest.json")
    error = falls_back(root, NEW)
    assert "symbolic link" in str(error)
    assert cli.main(["verify", str(root / NEW)]) == CorruptCheckpointError.exit_code


def sealed_h5(mgr: safepoint.CheckpointManager, name: str, build: Callable[[Any], None]) -> Path:
    """Commit single-file checkpoint ``name`` whose HDF5 content ``build(h5)`` writes.

    A ``build`` with a ``patch`` attribute then edits the closed file's bytes (before
    the seal, so the file's own checksum holds and only HDF5 can notice).
    """
    h5py = pytest.importorskip("h5py")

    def write(path: str) -> None:
        with h5py.File(path, "w") as h5:
            build(h5)
        patch = getattr(build, "patch", None)
        if patch is not None:
            patch(Path(path))

    mgr.save_file(name, write, step=9, epoch=None, metrics={}, layout="hostile-test")
    return Path(mgr.storage.root) / name


def test_single_file_link_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = good_root(tmp_path)
    elsewhere = safepoint.CheckpointManager(tmp_path / "elsewhere")
    target = sealed_h5(elsewhere, "weights.best.h5", lambda h5: h5.create_dataset("w", data=[7.0]))
    elsewhere.close()
    os.symlink(target, root / "weights.best.h5")
    mgr = safepoint.CheckpointManager(root)
    assert mgr.restore().name == NEW  # the link is no checkpoint of this root
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        mgr.restore(checkpoint="weights.best.h5")
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        safepoint.load(root / "weights.best.h5")
    # A path typed on the command line is the user's own choice and is resolved first
    # (tests/test_cli_wrong_paths.py): the CLI verifies the real file it points to.
    code = cli.main(["verify", str(root / "weights.best.h5")])
    assert code == 0


def test_single_file_swapped_for_a_link_between_check_and_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = good_root(tmp_path)
    mgr = safepoint.CheckpointManager(root)
    path = sealed_h5(mgr, "weights.best.h5", lambda h5: h5.create_dataset("w", data=[1.0]))
    mgr.close()
    elsewhere = safepoint.CheckpointManager(tmp_path / "elsewhere")
    target = sealed_h5(elsewhere, "weights.best.h5", lambda h5: h5.create_dataset("w", data=[7.0]))
    elsewhere.close()
    real_lstat = os.lstat
    swapped: list[bool] = []

    def lstat_then_swap(p: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        # The check sees the committed regular file; right after it, an attacker
        # replaces the name with a link to another (valid) checkpoint file.
        info = real_lstat(p, *args, **kwargs)
        if os.fspath(p) == str(path) and not swapped:
            swapped.append(True)
            os.symlink(target, str(path) + ".swap")
            os.replace(str(path) + ".swap", path)
        return info

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        bounded(lambda: safepoint.load(path))
    assert swapped


# ---------------------------------------------------------------------------- HDF5
def _diamond(h5: Any) -> None:
    """40 groups, each linked twice from the one before: 2**40 paths, 41 objects."""
    groups = [h5.create_group(f"g{i}") for i in range(41)]
    for upper, lower in itertools.pairwise(groups):
        upper["left"] = lower
        upper["right"] = lower
    groups[-1].create_dataset("w", data=np.zeros(0))  # no bytes: no budget runs out


def _cycle(h5: Any) -> None:
    """A group linked twice from inside itself: unbounded paths, one object."""
    group = h5.create_group("layer")
    group.create_dataset("w", data=np.zeros(0))
    group["again"] = group
    group["once_more"] = group


def _null_dataspace(h5: Any) -> None:
    import h5py

    h5.create_dataset("w", data=h5py.Empty("f4"))


_CHECKED = np.arange(4096, dtype=np.int64) * 7919


def _bad_fletcher32(h5: Any) -> None:
    h5.create_dataset("w", data=_CHECKED, chunks=(4096,), fletcher32=True)


def _flip_a_data_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.find(_CHECKED[100:104].tobytes())
    assert at > 0
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


_bad_fletcher32.patch = _flip_a_data_byte  # type: ignore[attr-defined]


@pytest.mark.parametrize("build", [_diamond, _cycle, _null_dataspace, _bad_fletcher32])
def test_hostile_hdf5_single_file(tmp_path: Path, build: Callable[[Any], None]) -> None:
    root = good_root(tmp_path)
    mgr = safepoint.CheckpointManager(root)
    sealed_h5(mgr, "weights.best.h5", build)
    mgr.close()
    mgr = safepoint.CheckpointManager(root)
    assert [c.name for c in mgr.checkpoints()] == [OLD, NEW, "weights.best.h5"]
    with pytest.raises(CorruptCheckpointError):
        bounded(lambda: mgr.restore(checkpoint="weights.best.h5"))
    got = bounded(lambda: mgr.restore())
    assert got is not None and got.name == NEW  # the newest that reads
    assert bounded(lambda: cli.main(["verify", "--deep", str(root)])) == 5


# ---------------------------------------------------------------------------- zips
def sealed_keras(mgr: safepoint.CheckpointManager, name: str) -> Path:
    h5py = pytest.importorskip("h5py")

    def write(path: str) -> None:
        weights = io.BytesIO()
        with h5py.File(weights, "w") as h5:
            h5.create_dataset("w", data=np.arange(64.0))
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("config.json", json.dumps({"class_name": "Sequential"}))
            z.writestr("model.weights.h5", weights.getvalue())

    mgr.save_file(name, write, step=9, epoch=None, metrics={}, layout="hostile-keras")
    return Path(mgr.storage.root) / name


def zip_bytes(
    entries: list[tuple[str, bytes, int, int, int]],
    *,
    extra_names: int = 0,
    flags: dict[str, int] | None = None,
) -> bytes:
    """A zip built by hand: ``(name, stored bytes, method, crc, size)`` per entry.

    ``extra_names`` more directory records all point at the first entry: a small
    file whose directory declares that many entries. ``flags``: general purpose
    bits by entry name (bit 0: encrypted).
    """
    out: list[bytes] = []
    directory: list[bytes] = []
    offset = 0
    for name, data, method, crc, size in entries:
        raw = name.encode()
        bits = (flags or {}).get(name, 0)
        head = struct.pack(
            "<4s5H3L2H", b"PK\x03\x04", 20, bits, method, 0, 0x21, crc, len(data), size, len(raw), 0
        )
        record = (method, crc, len(data), size, offset)
        directory.append(_central(raw, *record, bits=bits))
        out += [head, raw, data]
        offset += len(head) + len(raw) + len(data)
    first = entries[0]
    extra = _central(b"assets/0000000", first[2], first[3], len(first[1]), first[4], 0)
    directory += [extra] * extra_names
    cd = b"".join(directory)
    count = min(len(directory), 0xFFFF)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(cd), offset, 0)
    return b"".join(out) + cd + end


def _central(
    raw: bytes, method: int, crc: int, stored: int, size: int, offset: int, *, bits: int = 0
) -> bytes:
    """One central directory record for entry name ``raw``."""
    fields = (20, 20, bits, method, 0, 0x21, crc, stored, size, len(raw), 0, 0, 0, 0, 0, offset)
    return struct.pack("<4s6H3L5H2L", b"PK\x01\x02", *fields) + raw


def rebuilt(
    path: Path, *, bomb: bool = False, extra_names: int = 0, damage: str | None = None
) -> None:
    """Rebuild the sealed zip at ``path``; ``bomb``: its weights inflate to 3.9 GB.

    ``damage``: "deflate" flips a byte of the weights' deflate stream (bit rot),
    "encrypted" marks the manifest entry encrypted, "method" gives the weights an
    unknown compression method.
    """
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    out = []
    for name, data in entries:
        if bomb and name == "model.weights.h5":
            # Deflate blocks of 1 MiB of zeros, each flushed to a byte boundary with no
            # history, so the block repeats: 3,900 of them, ~4 MB, inflate to 3.9 GiB.
            c = zlib.compressobj(1, zlib.DEFLATED, -15)
            block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
            data = block * 3900 + zlib.compressobj(1, zlib.DEFLATED, -15).flush()
            out.append((name, data, zipfile.ZIP_DEFLATED, 0, 3900 << 20))
        elif damage == "deflate" and name == "model.weights.h5":
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            packed = bytearray(c.compress(data) + c.flush())
            packed[len(packed) // 2] ^= 0x55
            out.append((name, bytes(packed), zipfile.ZIP_DEFLATED, zlib.crc32(data), len(data)))
        elif damage == "method" and name == "model.weights.h5":
            out.append((name, data, 99, zlib.crc32(data), len(data)))
        else:
            out.append((name, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)))
    flags = {"safepoint-manifest.json": 1} if damage == "encrypted" else {}
    path.write_bytes(zip_bytes(out, extra_names=extra_names, flags=flags))


@pytest.mark.parametrize(
    "how",
    [
        {"bomb": True},
        {"extra_names": 200_000},
        {"damage": "deflate"},
        {"damage": "encrypted"},
        {"damage": "method"},
    ],
)
def test_hostile_keras_zip(tmp_path: Path, how: dict[str, Any]) -> None:
    root = good_root(tmp_path)
    mgr = safepoint.CheckpointManager(root)
    path = sealed_keras(mgr, "best.keras")
    mgr.close()
    rebuilt(path, **how)
    mgr = safepoint.CheckpointManager(root)
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(CorruptCheckpointError):
            bounded(lambda: mgr.restore(checkpoint="best.keras"))
        got = bounded(lambda: mgr.restore())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got is not None and got.name == NEW
    assert peak < 64 << 20, peak  # never inflated, never parsed into objects
    assert time.monotonic() - started < LIMIT


# ---------------------------------------------------------------------------- parse cost
@pytest.mark.heavy
def test_manifest_that_parses_into_gigabytes(tmp_path: Path) -> None:
    root = good_root(tmp_path)
    text = (root / NEW / "manifest.json").read_bytes()
    # 60 MB, under the 64 MiB cap: 20 million empty lists, ~1.3 GB as Python objects.
    pad = b'"pad": [' + b"[]," * 20_000_000 + b"[]], "
    (root / NEW / "manifest.json").write_bytes(text.replace(b'"extra": {', b'"extra": {' + pad))
    tracemalloc.start()
    try:
        error = falls_back(root, NEW)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "JSON objects/arrays" in str(error) and "MiB" in str(error)
    assert peak < 256 << 20, peak


@pytest.mark.heavy
def test_safetensors_header_that_parses_into_gigabytes(tmp_path: Path) -> None:
    root = good_root(tmp_path)
    payload = root / NEW / "model-00000.safetensors"
    raw = payload.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + hlen].rstrip()
    # A "junk" member of 20 million empty lists before the real entries.
    header = b'{"junk": [' + b"[]," * 20_000_000 + b"[]], " + header[1:]
    header += b" " * (-len(header) % 8)
    data = struct.pack("<Q", len(header)) + header + raw[8 + hlen :]
    payload.write_bytes(data)
    body = read_manifest(root / NEW)  # re-signed for the new file: only the parse can refuse
    body["files"]["model-00000.safetensors"] = {
        "size": len(data),
        checksum.ALGORITHM: checksum.digest_bytes(data),
    }
    write_manifest(root / NEW, body)
    tracemalloc.start()
    try:
        error = falls_back(root, NEW, listed=True, checksums_hold=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "more JSON than its tensors need" in str(error)
    assert peak < 512 << 20, peak


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}])
def test_safetensors_header_with_an_unhashable_dtype(tmp_path: Path, dtype: Any) -> None:
    root = good_root(tmp_path)
    payload = root / NEW / "model-00000.safetensors"
    raw = payload.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    header["w"]["dtype"] = dtype
    del header["__metadata__"]  # one container less: as many as the tensors need
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + raw[8 + hlen :]
    payload.write_bytes(data)
    body = read_manifest(root / NEW)
    body["files"]["model-00000.safetensors"] = {
        "size": len(data),
        checksum.ALGORITHM: checksum.digest_bytes(data),
    }
    write_manifest(root / NEW, body)
    error = falls_back(root, NEW, listed=True, checksums_hold=True)
    assert "allow-list" in str(error)


def test_socket_where_a_manifest_belongs(tmp_path: Path) -> None:
    import socket

    root = good_root(tmp_path)
    (root / NEW / "manifest.json").unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / NEW / "manifest.json"))
        error = falls_back(root, NEW)
    assert "socket" in str(error)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_device_where_a_payload_belongs(tmp_path: Path) -> None:
    import stat

    root = good_root(tmp_path)
    payload = root / NEW / "model-00000.safetensors"
    payload.unlink()
    os.mknod(payload, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless bytes
    error = falls_back(root, NEW, listed=True)
    assert "character device" in str(error)


@pytest.mark.slow  # ~30 s: the state tree codec walks 5 million list items twice
def test_large_real_manifests_stay_within_the_parse_cap(tmp_path: Path) -> None:
    # The cap refuses what parses into more than a real manifest can: a state with a
    # long plain list (5 million small ints, ~25 MB of manifest) still round-trips.
    labels = [index % 10 for index in range(5_000_000)]
    mgr = safepoint.CheckpointManager(tmp_path / "run")
    mgr.save({"labels": labels, "w": np.arange(4.0)}, step=1)
    got = bounded(lambda: safepoint.CheckpointManager(tmp_path / "run").restore(), seconds=60)
    assert got.state["labels"] == labels
