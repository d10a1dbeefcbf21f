"""A fault at every stage of a save, injected through the storage seam.

``LocalStorage._fault(stage, target)`` is called right before each I/O step of a
save; a subclass raises ``EIO`` there. Whatever the stage, the save must raise a
``StorageError`` naming it, the previous checkpoint must still be the latest and
restore bit-exactly, nothing half-written may be listed, and the next save works.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint.storage import commit as transaction
from safepoint.storage.local import TMP_MARK, TRASH_PREFIX, LocalStorage
from safepoint_testing import FaultyStorage, listing

STAGES = ["stage", "open", "write", "fsync", "manifest", "dir-fsync", "rename", "retention"]


def state_for(step: int) -> dict[str, object]:
    rng = np.random.default_rng(step)
    return {
        "w": rng.standard_normal((64, 32)).astype(np.float32),
        "b": rng.integers(0, 2**31, size=17, dtype=np.int64),
        "step": step,
    }


def assert_restores(mgr: safepoint.CheckpointManager, step: int) -> None:
    ckpt = mgr.restore()
    assert ckpt is not None and ckpt.step == step
    expected = state_for(step)
    assert ckpt.state["step"] == step
    for k in ("w", "b"):
        assert ckpt.state[k].dtype == expected[k].dtype  # type: ignore[union-attr]
        assert ckpt.state[k].tobytes() == expected[k].tobytes()  # type: ignore[union-attr]


def no_leftovers(root: Path) -> bool:
    return not any(TMP_MARK in n or n.startswith(TRASH_PREFIX) for n in listing(root))


@pytest.mark.parametrize("stage", STAGES)
def test_fault_at_each_stage(tmp_path: Path, stage: str) -> None:
    root = tmp_path / "run"
    storage = FaultyStorage(root)
    # keep=last 1 makes retention delete the previous checkpoint on every save
    mgr = safepoint.CheckpointManager(storage, keep=safepoint.Keep(last=1))
    mgr.save(state_for(1), step=1)
    mgr.save(state_for(2), step=2)
    assert [c.step for c in mgr.checkpoints()] == [2]

    storage.stage_to_fail = stage
    with pytest.raises(safepoint.StorageError) as info:
        mgr.save(state_for(3), step=3)
    err = info.value
    assert err.stage == stage
    assert err.errno == errno.EIO
    assert isinstance(err, OSError)
    assert stage in str(err)
    assert storage.stage_to_fail is None, f"stage {stage!r} was never reached"

    if stage == "retention":
        # the new checkpoint was committed before retention ran: it is the latest now,
        # and the one retention failed to delete is still whole
        assert [c.step for c in mgr.checkpoints()] == [2, 3]
        assert_restores(mgr, 3)
    else:
        assert [c.step for c in mgr.checkpoints()] == [2]
        assert_restores(mgr, 2)
    assert all(v.ok for v in mgr.verify())
    assert no_leftovers(root), listing(root)

    # a fresh reader (another process, or after a restart) sees the same
    reader = safepoint.CheckpointManager(root)
    assert reader.latest() == mgr.latest()

    mgr.save(state_for(4), step=4)
    assert [c.step for c in mgr.checkpoints()] == [4]
    assert_restores(mgr, 4)
    assert no_leftovers(root)
    mgr.close()


def test_every_stage_is_reached_by_a_save(tmp_path: Path) -> None:
    """The seam covers every stage named above (so the parametrisation is exhaustive)."""
    storage = FaultyStorage(tmp_path / "run")
    with safepoint.CheckpointManager(storage, keep=safepoint.Keep(last=1)) as mgr:
        mgr.save(state_for(1), step=1)
        mgr.save(state_for(2), step=2)
    assert {s for s, _ in storage.hits} == set(STAGES)


@pytest.mark.parametrize("stage", ["write", "fsync", "rename", "dir-fsync"])
def test_fault_when_replacing_same_name(tmp_path: Path, stage: str, exchange: bool) -> None:
    """Re-saving a committed name that fails must leave the old one in place."""
    root = tmp_path / "run"
    storage = FaultyStorage(root)
    with safepoint.CheckpointManager(storage) as mgr:
        mgr.save(state_for(5), step=5)
        storage.stage_to_fail = stage
        with pytest.raises(safepoint.StorageError):
            mgr.save(state_for(6), step=5)
        assert [c.step for c in mgr.checkpoints()] == [5]
        assert_restores(mgr, 5)
        assert no_leftovers(root), listing(root)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_storage_error_keeps_errno_and_hint(tmp_path: Path, code: int) -> None:
    class Full(LocalStorage):
        def _fault(self, stage: str, target: str) -> None:
            if stage == "write":
                raise OSError(code, "injected")

    with safepoint.CheckpointManager(Full(tmp_path / "run")) as mgr:
        with pytest.raises(safepoint.StorageError) as info:
            mgr.save(state_for(1), step=1)
        assert info.value.errno == code
        assert mgr.checkpoints() == []
    assert no_leftovers(tmp_path / "run")


def test_fault_in_the_middle_of_a_sharded_save(tmp_path: Path) -> None:
    """The second shard's write fails after the first shard is durable."""

    class SecondShard(LocalStorage):
        def _fault(self, stage: str, target: str) -> None:
            if stage == "open" and target.endswith("model-00001.safetensors"):
                raise OSError(errno.EIO, "injected")

    root = tmp_path / "run"
    with safepoint.CheckpointManager(root, shard_bytes=4096) as mgr:
        mgr.save(state_for(1), step=1)
    with safepoint.CheckpointManager(SecondShard(root), shard_bytes=4096) as mgr:
        with pytest.raises(safepoint.StorageError) as info:
            mgr.save(state_for(2), step=2)
        assert info.value.stage == "open"
        assert_restores(mgr, 1)
    assert no_leftovers(root)


class RootFsyncFails(LocalStorage):
    """Fails the root directory fsync that makes the commit rename durable."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.armed = False

    def _fault(self, stage: str, target: str) -> None:
        if self.armed and stage == "dir-fsync" and target == "":
            self.armed = False
            raise OSError(errno.EIO, "injected")


@pytest.fixture(params=[True, False], ids=["renameat2", "no-renameat2"])
def exchange(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run with the atomic swap, and as on a file system without RENAME_EXCHANGE."""
    if not request.param:
        monkeypatch.setattr(transaction, "_exchange", lambda root, a, b: False)
    return bool(request.param)


@pytest.mark.parametrize("same_name", [False, True], ids=["new-name", "same-name"])
def test_fault_in_root_fsync_after_rename(tmp_path: Path, same_name: bool, exchange: bool) -> None:
    """The rename happened but is not durable: the save fails and the old one survives."""
    root = tmp_path / "run"
    storage = RootFsyncFails(root)
    with safepoint.CheckpointManager(storage) as mgr:
        mgr.save(state_for(1), step=1)
        storage.armed = True
        with pytest.raises(safepoint.StorageError) as info:
            mgr.save(state_for(2), step=1 if same_name else 2)
        assert info.value.stage == "dir-fsync"
        assert not storage.armed
        assert [c.name for c in mgr.checkpoints()] == ["step-00000001"]
        ckpt = mgr.restore()
        assert ckpt is not None
        assert ckpt.state["w"].tobytes() == state_for(1)["w"].tobytes()  # type: ignore[union-attr]
        assert no_leftovers(root), listing(root)
        mgr.save(state_for(3), step=3)
        assert [c.step for c in mgr.checkpoints()] == [1, 3]


def test_failed_rename_without_renameat2_puts_the_old_checkpoint_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an atomic swap the old checkpoint is moved aside first; if the new one
    then cannot be renamed in, the old one must come back under its name."""
    monkeypatch.setattr(transaction, "_exchange", lambda root, a, b: False)
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as mgr:
        mgr.save(state_for(1), step=1)
        real_rename = os.rename

        def rename(src: str, dst: str) -> None:
            if TMP_MARK in os.path.basename(src):
                raise OSError(errno.EIO, "injected")
            real_rename(src, dst)

        monkeypatch.setattr(os, "rename", rename)
        with pytest.raises(safepoint.StorageError) as info:
            mgr.save(state_for(2), step=1)
        monkeypatch.setattr(os, "rename", real_rename)
        assert info.value.stage == "rename"
        assert [c.name for c in mgr.checkpoints()] == ["step-00000001"]
        assert_restores(mgr, 1)
        assert no_leftovers(root), listing(root)
