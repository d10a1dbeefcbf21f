"""Async staging laid out as the payload files, and writes that pass through uncopied.

An async save copies the state once, into an arena shaped like the safetensors files
it will become, and the writer hands page-aligned slices of that arena to the device.
These tests check the bytes (every file readable by ``safe_open``, equal to what was
saved, across shards, dtypes and odd sizes) and that the second copy is really gone,
by counting what the writer copies; timing lives in ``bench/async_stall.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xxhash
from safetensors import safe_open

import safepoint
from safepoint.formats import shards
from safepoint.formats.safetensors import header_bytes
from safepoint.ondisk.names import TMP_MARK, TRASH_PREFIX
from safepoint.state.tree import flatten
from safepoint.storage import files as localfile
from safepoint.storage import payload_write
from safepoint.storage import staging as snapshot
from safepoint.storage.local import LocalStorage
from safepoint.storage.staging import Staging, image_layout
from safepoint_testing import Faults

torch = pytest.importorskip("torch")


def mixed_state(seed: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(512, 1024, generator=gen),  # 2 MiB
        "b": torch.randn(1001, generator=gen).bfloat16(),  # odd size: later offsets unaligned
        "i": torch.arange(3000, dtype=torch.int64) * seed,
        "t": torch.randn(64, 96, generator=gen).t(),  # not contiguous
        "np": np.arange(777, dtype=np.float16),
        "empty": torch.zeros(0, 3),
        "step": seed,
    }


class CopyCounter:
    """Counts the bytes ``PayloadStream`` copies into its write chunks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.copied = 0
        original = payload_write.PayloadStream._copy

        def counting(stream: payload_write.PayloadStream, src: np.ndarray) -> None:
            self.copied += src.nbytes
            original(stream, src)

        monkeypatch.setattr(payload_write.PayloadStream, "_copy", counting)


def assert_files_hold(ckpt: safepoint.Checkpoint, state: dict[str, object]) -> None:
    seen = {}
    for name in sorted(os.listdir(ckpt.path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(ckpt.path, name), "pt") as f:
                seen.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    for key in ("w", "b", "i", "t", "empty"):
        assert torch.equal(seen[key], state[key]), key  # type: ignore[arg-type]
    np.testing.assert_array_equal(seen["np"].numpy(), state["np"])


@pytest.mark.parametrize("shard_bytes", [1 << 40, 1 << 20])
def test_async_save_writes_the_staged_images_without_a_second_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard_bytes: int
) -> None:
    counter = CopyCounter(monkeypatch)
    state = mixed_state(3)
    with safepoint.CheckpointManager(tmp_path, async_save=True, shard_bytes=shard_bytes) as mgr:
        ckpt = mgr.save(state, step=1)
        mgr.wait()
        assert all(v.ok for v in mgr.verify())
        files = [n for n in os.listdir(ckpt.path) if n.endswith(".safetensors")]
        assert (len(files) > 1) == (shard_bytes < 1 << 30)
        # Only each file's unaligned tail (< 4 KiB) is copied; the rest passes through.
        assert counter.copied < len(files) * localfile.ALIGN
        assert_files_hold(ckpt, state)
        restored = mgr.restore()
    assert restored is not None and restored.state["step"] == 3


def test_sync_save_still_copies_into_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: live tensors are not page-aligned file images, so they are copied."""
    counter = CopyCounter(monkeypatch)
    state = mixed_state(4)
    with safepoint.CheckpointManager(tmp_path) as mgr:
        ckpt = mgr.save(state, step=1)
    payload = sum(os.path.getsize(os.path.join(ckpt.path, n)) for n in os.listdir(ckpt.path))
    assert counter.copied > (2 << 20)
    assert counter.copied < payload
    assert_files_hold(ckpt, state)


def test_staged_images_when_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(localfile, "_enable_direct", lambda fd: False)
    state = mixed_state(5)
    with safepoint.CheckpointManager(tmp_path, async_save=True, shard_bytes=1 << 20) as mgr:
        ckpt = mgr.save(state, step=1)
        mgr.wait()
        assert all(v.ok for v in mgr.verify())
    assert_files_hold(ckpt, state)


def test_hdf5_async_keeps_the_plain_layout(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    state = mixed_state(6)
    with safepoint.CheckpointManager(tmp_path, async_save=True, format="hdf5") as mgr:
        mgr.save(state, step=1)
        mgr.wait()
        restored = mgr.restore()
    assert restored is not None
    assert torch.equal(restored.state["b"], state["b"])  # type: ignore[arg-type]
    assert torch.equal(restored.state["t"], state["t"])  # type: ignore[arg-type]


def test_image_layout_starts_every_file_on_a_page() -> None:
    _, leaves = flatten(mixed_state(7))
    groups = list(shards(leaves, 1 << 20))
    prefixes = [header_bytes(g) for g in groups]
    spans, offsets, need = image_layout(groups, prefixes)
    assert len(spans) == len(groups) > 1
    flat = [leaf for g in groups for leaf in g]
    index = 0
    for (start, end), group, prefix in zip(spans, groups, prefixes, strict=True):
        assert start % 4096 == 0
        assert end - start == len(prefix) + sum(leaf.nbytes for leaf in group)
        position = start + len(prefix)
        for leaf in group:  # tensors back to back, as the safetensors data region
            assert offsets[index] == position and flat[index] is leaf
            position += leaf.nbytes
            index += 1
    assert need == spans[-1][1]


def test_capture_over_the_cap_returns_none_and_allocates_nothing() -> None:
    _, leaves = flatten(mixed_state(8))
    staging = Staging(max_bytes=1024)
    assert staging.capture([leaves], [header_bytes(leaves)]) is None
    assert staging.nbytes == 0


def write_stream(path: Path, parts: list[np.ndarray], *, direct: bool) -> tuple[int, str]:
    storage = LocalStorage(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    sink = localfile.LocalWriter(storage, path.name, fd, direct=direct)
    assert sink.direct == direct
    stream = payload_write.PayloadStream(sink, size_hint=sum(p.nbytes for p in parts))
    for part in parts:
        stream.write(part.data)
    return stream.close()


@pytest.mark.parametrize("direct", [True, False])
def test_stream_mixes_passed_through_and_copied_buffers(tmp_path: Path, direct: bool) -> None:
    rng = np.random.default_rng(0)
    aligned = np.frombuffer(payload_write.aligned(5 << 20), dtype=np.uint8)
    aligned[:] = rng.integers(0, 255, aligned.nbytes, dtype=np.uint8)
    parts = [
        aligned[: (3 << 20) + 100],  # aligned start, unaligned end: pass-through + tail
        rng.integers(0, 255, 333, dtype=np.uint8),  # mid-chunk: copied
        aligned[4096 : 4096 + (1 << 20)],  # aligned address, unaligned file position
        aligned,  # the whole buffer again
    ]
    path = tmp_path / "f.bin"
    size, digest = write_stream(path, parts, direct=direct)
    expected = b"".join(p.tobytes() for p in parts)
    assert size == len(expected)
    assert path.read_bytes() == expected
    assert digest == xxhash.xxh3_64_hexdigest(expected)


def test_pinning_fails_soft_without_cuda(caplog: pytest.LogCaptureFixture) -> None:
    """Where the staging memory cannot be page-locked, snapshots still work unpinned."""
    if torch.cuda.is_available():
        pytest.skip("this checks the fallback of a machine without CUDA")
    arena = np.frombuffer(payload_write.aligned(1 << 16), dtype=np.uint8)
    with caplog.at_level("INFO", logger="safepoint"):
        assert snapshot._pin(arena) is False
    assert "copying unpinned" in caplog.text


def test_failure_midway_through_passed_through_writes(tmp_path: Path) -> None:
    """An I/O error on the 2nd of several 32 MiB pass-through writes: the pieces still
    queued are dropped, the error surfaces on wait(), the previous checkpoint stays."""
    faults = Faults()
    storage = LocalStorage(tmp_path, faults=faults)
    big = {"w": torch.arange(20 << 20, dtype=torch.float32)}  # 80 MiB: three pieces
    with safepoint.CheckpointManager(storage, async_save=True) as mgr:
        mgr.save(big, step=1)
        mgr.wait()
        faults.hits.clear()
        faults.arm("write", nth=2)  # EIO on the 2nd payload write call
        big["w"].add_(1.0)
        mgr.save(big, step=2)
        with pytest.raises(safepoint.StorageError, match="write"):
            mgr.wait()
        assert faults.stages.count("write") == 2  # nothing was written after the failure
        assert [c.step for c in mgr.checkpoints()] == [1]
        restored = mgr.restore()
        assert restored is not None
        assert torch.equal(restored.state["w"], torch.arange(20 << 20, dtype=torch.float32))
        faults.disarm()
        mgr.save(big, step=3)
        mgr.wait()
    assert [c.step for c in safepoint.CheckpointManager(tmp_path).checkpoints()] == [1, 3]
    leftovers = [n for n in os.listdir(tmp_path) if TMP_MARK in n or n.startswith(TRASH_PREFIX)]
    assert leftovers == []  # the failed save's staging directory was removed
