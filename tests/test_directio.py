"""The payload I/O paths: O_DIRECT and its buffered fallback, mapped and lazy reads."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import safepoint
from safepoint.storage import files as localfile
from safepoint.storage import payload_read, payload_write


def state() -> dict[str, object]:
    rng = np.random.default_rng(0)
    return {
        "big": rng.standard_normal(3 << 18).astype(np.float32),  # 3 MiB: several chunks
        "odd": rng.integers(0, 255, size=4097, dtype=np.uint8),  # leaves an unaligned tail
        "empty": np.zeros((0, 5), dtype=np.float64),
        "scalar": np.float16(1.5),
    }


def roundtrip(root: Path) -> None:
    saved = state()
    with safepoint.CheckpointManager(root) as mgr:
        ckpt = mgr.save(saved, step=1)
        assert all(v.ok for v in mgr.verify())
        loaded = mgr.restore()
    assert loaded is not None
    for key, value in saved.items():
        np.testing.assert_array_equal(loaded.state[key], value)
    with safe_open(str(Path(ckpt.path) / "model-00000.safetensors"), "np") as f:
        np.testing.assert_array_equal(f.get_tensor("big"), saved["big"])
        np.testing.assert_array_equal(f.get_tensor("odd"), saved["odd"])


def _o_direct_supported(directory: Path) -> bool:
    probe = directory / ".probe"
    fd = os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        return localfile._enable_direct(fd)
    finally:
        os.close(fd)
        probe.unlink()


def test_payload_bytes_go_to_the_device_with_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only a round trip: the payload's aligned bytes are written by O_DIRECT calls."""
    if not hasattr(os, "O_DIRECT") or not _o_direct_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT; the buffered path runs")
    direct_bytes: dict[str, int] = {}
    real_write = os.write

    def watching(fd: int, data: object) -> int:
        n = real_write(fd, data)  # type: ignore[arg-type]
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.endswith(".safetensors") and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            key = os.path.basename(target)
            direct_bytes[key] = direct_bytes.get(key, 0) + n
        return n

    monkeypatch.setattr(os, "write", watching)
    roundtrip(tmp_path)
    written = sum(direct_bytes.values())
    assert written >= (3 << 20) - 4096, direct_bytes  # the 3 MiB tensor, bar the tail


def test_buffered_writes_where_the_file_system_refuses_o_direct(tmp_path: Path) -> None:
    """A FUSE or network mount may refuse the flag: writes fall back, bytes stay exact."""
    root = tmp_path / "plain"
    root.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(localfile, "_enable_direct", lambda fd: False)
        roundtrip(root)


def test_buffered_fallback_where_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(localfile, "_enable_direct", lambda fd: False)
    roundtrip(tmp_path)


def test_read_fallback_where_files_cannot_be_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(19, "No such device (mmap refused)")

    monkeypatch.setattr(payload_read, "map_image", refuse)
    roundtrip(tmp_path)


def test_chunk_size_keeps_writer_memory_small() -> None:
    assert payload_write.chunk_size(0) == payload_write.MIN_CHUNK
    assert payload_write.chunk_size(1 << 30) == payload_write.MAX_CHUNK
    for total in (1 << 20, 64 << 20, 256 << 20, 1 << 30):
        assert payload_write.DEPTH * payload_write.chunk_size(total) <= max(total // 20, 3 << 20)


def test_lazy_load_maps_without_reading(tmp_path: Path) -> None:
    saved = state()
    with safepoint.CheckpointManager(tmp_path) as mgr:
        ckpt = mgr.save(saved, step=1)
    lazy = safepoint.load(ckpt.path, mmap=True)
    np.testing.assert_array_equal(lazy["big"], saved["big"])
    lazy["big"][0] = 42.0  # copy-on-write: the file is unchanged
    again = safepoint.load(ckpt.path)
    np.testing.assert_array_equal(again["big"], saved["big"])
