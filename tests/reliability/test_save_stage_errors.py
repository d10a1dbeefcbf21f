"""An error at every stage of a save (the storage's fault hook), and what it must leave.

A fault at every stage of a save, injected through the storage seam.

``LocalStorage``'s ``faults`` hook is called right before each I/O step of a
save; ``safepoint_testing.Faults`` raises ``EIO`` there. Whatever the stage, the save must raise a
``StorageError`` naming it, the previous checkpoint must still be the latest and
restore bit-exactly, nothing half-written may be listed, and the next save works.

Family 1: an exception at every stage of a save, through the storage interface.

``LocalStorage``'s ``faults`` hook is called before each stage acts (staging
mkdir, opening and writing each payload, every fsync, the manifest, the directory
fsyncs, the rename, each retention deletion). A probe save records the sequence; then
each position in turn raises EIO. The save must raise ``StorageError`` naming that
stage, the previous checkpoint must still be latest and restore bit-exactly (unless the
failure came after the commit, in retention), and nothing staged may be left behind.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from faultkit import Oracle, leftovers, make_state, metrics_for

import safepoint
from safepoint.storage import commit as transaction
from safepoint.storage.local import FAULT_STAGES, TMP_MARK, TRASH_PREFIX
from safepoint_testing import Faults, fail_at, faulty_manager, listing

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
    faults = Faults()
    # keep=last 1 makes retention delete the previous checkpoint on every save
    mgr = faulty_manager(root, faults, keep=safepoint.Keep(last=1))
    mgr.save(state_for(1), step=1)
    mgr.save(state_for(2), step=2)
    assert [c.step for c in mgr.checkpoints()] == [2]

    faults.arm(stage)
    with pytest.raises(safepoint.StorageError) as info:
        mgr.save(state_for(3), step=3)
    err = info.value
    assert err.stage == stage
    assert err.errno == errno.EIO
    assert isinstance(err, OSError)
    assert stage in str(err)
    assert not faults.armed, f"stage {stage!r} was never reached"

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
    """The seam covers every stage named above (so the parametrisation is exhaustive),
    and those are the stages the storage documents."""
    faults = Faults()
    with faulty_manager(tmp_path / "run", faults, keep=safepoint.Keep(last=1)) as mgr:
        mgr.save(state_for(1), step=1)
        mgr.save(state_for(2), step=2)
    assert set(faults.stages) == set(STAGES) == set(FAULT_STAGES)


def test_a_fault_at_a_misspelt_stage_is_refused_not_silently_never_fired() -> None:
    """A typo in a test's stage would make a fault that never fires (a test that cannot
    fail); the shared helper refuses it."""
    with pytest.raises(ValueError, match="unknown stage 'renmae'"):
        fail_at("renmae")
    hook = fail_at("rename", nth=2)
    hook("rename", "a")  # the first rename passes
    with pytest.raises(OSError) as info:
        hook("rename", "b")
    assert info.value.errno == errno.EIO and not hook.armed
    hook("rename", "c")  # fired once, as asked
    assert hook.hits == [("rename", "a"), ("rename", "b"), ("rename", "c")]


@pytest.mark.parametrize("stage", ["write", "fsync", "rename", "dir-fsync"])
def test_fault_when_replacing_same_name(tmp_path: Path, stage: str, exchange: bool) -> None:
    """Re-saving a committed name that fails must leave the old one in place."""
    root = tmp_path / "run"
    faults = Faults()
    with faulty_manager(root, faults) as mgr:
        mgr.save(state_for(5), step=5)
        faults.arm(stage)
        with pytest.raises(safepoint.StorageError):
            mgr.save(state_for(6), step=5)
        assert [c.step for c in mgr.checkpoints()] == [5]
        assert_restores(mgr, 5)
        assert no_leftovers(root), listing(root)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_storage_error_keeps_errno_and_hint(tmp_path: Path, code: int) -> None:
    full = fail_at("write", OSError(code, "injected"), times=None)
    with faulty_manager(tmp_path / "run", full) as mgr:
        with pytest.raises(safepoint.StorageError) as info:
            mgr.save(state_for(1), step=1)
        assert info.value.errno == code
        assert mgr.checkpoints() == []
    assert no_leftovers(tmp_path / "run")


def test_fault_in_the_middle_of_a_sharded_save(tmp_path: Path) -> None:
    """The second shard's write fails after the first shard is durable."""
    second_shard = fail_at(
        "open", times=None, target=lambda t: t.endswith("model-00001.safetensors")
    )

    root = tmp_path / "run"
    with safepoint.CheckpointManager(root, shard_bytes=4096) as mgr:
        mgr.save(state_for(1), step=1)
    with faulty_manager(root, second_shard, shard_bytes=4096) as mgr:
        with pytest.raises(safepoint.StorageError) as info:
            mgr.save(state_for(2), step=2)
        assert info.value.stage == "open"
        assert_restores(mgr, 1)
    assert no_leftovers(root)


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
    faults = Faults()
    with faulty_manager(root, faults) as mgr:
        mgr.save(state_for(1), step=1)
        # the root directory fsync that makes the commit rename durable
        faults.arm("dir-fsync", target="")
        with pytest.raises(safepoint.StorageError) as info:
            mgr.save(state_for(2), step=1 if same_name else 2)
        assert info.value.stage == "dir-fsync"
        assert not faults.armed
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


SEED = 17
NBYTES = 128 << 10


@pytest.mark.parametrize("fmt", ["safetensors", "hdf5"])
@pytest.mark.parametrize("keep", [None, 1], ids=["keep-all", "keep-last-1"])
def test_error_at_every_stage(tmp_path, fmt, keep):
    if fmt == "hdf5":
        pytest.importorskip("h5py")
    template = tmp_path / "template"
    mgr = safepoint.CheckpointManager(template, format=fmt, shard_bytes=48 << 10)
    for step in (1, 2):
        mgr.save(make_state(SEED, step, NBYTES), step=step, metrics=metrics_for(step))
    mgr.close()

    def save(faults: Faults) -> None:
        m = faulty_manager(
            root,
            faults,
            format=fmt,
            shard_bytes=48 << 10,
            keep=safepoint.Keep(last=keep) if keep else None,
        )
        try:
            m.save(make_state(SEED, 3, NBYTES), step=3, metrics=metrics_for(3))
        finally:
            m.close()

    root = tmp_path / "run"
    shutil.copytree(template, root)
    probe = Faults()
    save(probe)
    stages = probe.stages
    assert {"stage", "manifest", "dir-fsync", "rename"} <= set(stages), stages
    if keep:
        assert "retention" in stages
    for k, stage in enumerate(stages, 1):
        shutil.rmtree(root)
        shutil.copytree(template, root)
        with pytest.raises(safepoint.StorageError) as info:
            save(fail_at(None, nth=k))  # EIO at the k-th stage of any kind
        err = info.value
        # The manifest's own fsync is part of writing the commit record.
        named = "manifest" if stage == "fsync" and stages[k - 2] == "manifest" else stage
        assert err.stage == named, (k, stage, err)
        assert err.errno == errno.EIO
        outcome = "new checkpoint was committed" if stage == "retention" else "intact"
        assert f"stage {named!r}" in str(err) and outcome in str(err)
        assert [n for n in leftovers(root) if ".tmp-" in n] == [], (stage, leftovers(root))
        committed = stage == "retention" or (stage == "dir-fsync" and "rename" in stages[: k - 1])
        oracle = Oracle(SEED, NBYTES, keep_last=keep, returned=2)
        if stage == "retention":
            oracle.in_flight = 3
        latest = oracle.check(root)
        assert latest == (3 if stage == "retention" else 2), (stage, latest, committed)
    print(f"\n[{fmt}, keep={keep}] EIO at each of {len(stages)} stages: {stages}")
