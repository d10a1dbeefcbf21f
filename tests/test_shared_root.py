"""Several managers on one root (issue 10 items 2 and 8): shared lock, unique seqs, and
retention that only ever prunes its own series."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint_testing import read_manifest, write_manifest


def state(value: float) -> dict[str, object]:
    return {"w": np.full((64, 64), value, dtype=np.float32)}


def test_two_async_managers_on_one_root_commit_every_save_with_unique_seqs(tmp_path: Path) -> None:
    root = tmp_path / "run"
    best = safepoint.CheckpointManager(
        root, name="best-{step:04d}", monitor="loss", keep=safepoint.Keep(best=1), async_save=True
    )
    last = safepoint.CheckpointManager(
        root, name="last-{step:04d}", keep=safepoint.Keep(last=2), async_save=True
    )
    errors: list[BaseException] = []

    def run(mgr: safepoint.CheckpointManager, offset: float) -> None:
        try:
            for step in range(1, 9):
                mgr.save(state(step + offset), step=step, metrics={"loss": 1.0 / step + offset})
            mgr.wait()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m, o)) for m, o in ((best, 0.0), (last, 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    best.close()
    last.close()
    assert errors == []
    listed = safepoint.CheckpointManager(root).checkpoints()
    seqs = [c.seq for c in listed]
    assert len(seqs) == len(set(seqs))
    assert sorted(c.name for c in listed) == ["best-0008", "last-0007", "last-0008"]
    for ckpt in listed:
        restored = safepoint.CheckpointManager(root).restore(checkpoint=ckpt.name)
        assert restored is not None and restored.step == ckpt.step


def test_retention_never_prunes_another_series_or_a_users_files(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    (root / "results").mkdir()
    with safepoint.CheckpointManager(
        root, name="best", monitor="loss", keep=safepoint.Keep(best=1)
    ) as b:
        b.save(state(0.0), step=1, metrics={"loss": 0.1})
    with safepoint.CheckpointManager(
        root, name="epoch-{step:03d}", keep=safepoint.Keep(last=2)
    ) as m:
        for step in range(1, 6):
            m.save(state(step), step=step, metrics={"loss": 1.0})
    names = sorted(os.listdir(root))
    assert "best" in names and "notes.txt" in names and "results" in names
    assert [c.name for c in safepoint.CheckpointManager(root).checkpoints()] == [
        "best",
        "epoch-004",
        "epoch-005",
    ]
    # restore/latest still see the whole root
    with safepoint.CheckpointManager(root, name="renamed-{step}") as other:
        latest = other.restore()
        assert latest is not None and latest.name == "epoch-005"


def test_checkpoints_without_a_recorded_series_are_matched_by_name(tmp_path: Path) -> None:
    """Checkpoints written before manifests recorded their series: the name decides."""
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root, name="weights.best") as b:
        b.save(state(0.0), step=1)
    with safepoint.CheckpointManager(root) as m:
        m.save(state(1.0), step=1)
        m.save(state(2.0), step=2)
    for name in ("weights.best", "step-00000001", "step-00000002"):
        body = read_manifest(root / name)
        assert body["extra"].pop("series")
        write_manifest(root / name, body)
    listed = safepoint.CheckpointManager(root).checkpoints()
    assert [c.name for c in listed] == ["weights.best", "step-00000001", "step-00000002"]
    with safepoint.CheckpointManager(root, keep=safepoint.Keep(last=1)) as m:
        m.save(state(3.0), step=3)
    assert [c.name for c in safepoint.CheckpointManager(root).checkpoints()] == [
        "weights.best",
        "step-00000003",
    ]


@pytest.mark.parametrize("same_process_second_root_spelling", [False, True])
def test_the_lock_is_shared_by_root_identity(
    tmp_path: Path, same_process_second_root_spelling: bool
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    other = root
    if same_process_second_root_spelling:
        os.symlink(root, tmp_path / "alias")
        other = tmp_path / "alias"
    a = safepoint.CheckpointManager(root)
    b = safepoint.CheckpointManager(other, name="b-{step}")
    a.save(state(1.0), step=1)
    b.save(state(2.0), step=2)
    a.close()
    b.save(state(3.0), step=3)
    b.close()
    assert [c.seq for c in safepoint.CheckpointManager(root).checkpoints()] == [1, 2, 3]
