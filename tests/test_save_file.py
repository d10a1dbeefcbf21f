"""``CheckpointManager.save_file``: the public way to commit a file a framework writes.

Keras-free: the "framework" here is h5py writing an HDF5 file at the path it is given.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint.cli.conversion import convert
from safepoint.errors import StorageError
from safepoint.storage import runlog
from safepoint.storage.local import LocalStorage

h5py = pytest.importorskip("h5py")


def _writer(value: float):  # type: ignore[no-untyped-def]
    def write(path: str) -> None:
        # The final suffix (frameworks check it), in a hidden staging entry of the root.
        assert path.endswith(".h5")
        assert os.path.basename(os.path.dirname(path)).startswith(".sp.tmp-")
        with h5py.File(path, "w") as f:
            f["w"] = np.full(4, value, np.float32)

    return write


def test_save_file_commits_logs_and_applies_retention(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(
        tmp_path, name="w-{step}.h5", keep=safepoint.Keep(last=2)
    ) as mgr:
        for step in (1, 2, 3):
            ckpt = mgr.save_file(
                f"w-{step}.h5", _writer(step), step=step, epoch=1, metrics={"loss": 1.0 / step}
            )
            assert ckpt.name == f"w-{step}.h5" and ckpt.step == step
        assert [c.name for c in mgr.checkpoints()] == ["w-2.h5", "w-3.h5"]
        assert [v.ok for v in mgr.verify()] == [True, True]
        restored = mgr.restore(checkpoint="w-3.h5")
    assert restored is not None and restored.metrics == {"loss": 1.0 / 3}
    events = [(e["event"], e["name"]) for e in runlog.read(LocalStorage(tmp_path))]
    assert events == [
        ("save", "w-1.h5"),
        ("save", "w-2.h5"),
        ("save", "w-3.h5"),
        ("delete", "w-1.h5"),
    ]
    with h5py.File(tmp_path / "w-3.h5", "r") as f:  # the framework reads its own file
        assert f["w"][0] == 3.0


def _another_process_can_lock(root: Path) -> bool:
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from safepoint.storage.local import LocalStorage;"
         " LocalStorage(sys.argv[1]).lock()", str(root)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert other.returncode == 0 or "Another writer holds the lock" in other.stderr, other.stderr
    return other.returncode == 0


def test_save_file_holds_the_writer_lock_for_that_save_only(tmp_path: Path) -> None:
    mgr = safepoint.CheckpointManager(tmp_path)
    mgr.save_file("w.h5", _writer(1.0), step=1)
    assert _another_process_can_lock(tmp_path)  # the root is free between saves
    mgr.close()


def test_the_lock_goes_when_the_last_staged_file_ends(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        first = mgr.stage_file("a.h5", _writer(1.0), step=1)
        second = mgr.stage_file("b.h5", _writer(2.0), step=2)
        first.commit()
        assert not _another_process_can_lock(tmp_path)  # the second is still staged
        second.commit()
        assert _another_process_can_lock(tmp_path)
        assert [c.name for c in mgr.checkpoints()] == ["a.h5", "b.h5"]
        mgr.save({"w": np.ones(2)}, step=3)  # a save keeps the lock until close()
        assert not _another_process_can_lock(tmp_path)
        mgr.release_lock()
        assert _another_process_can_lock(tmp_path)


def test_a_staged_file_that_is_discarded_leaves_nothing(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        staged = mgr.stage_file("w.h5", _writer(1.0), step=1)
        assert [n for n in os.listdir(tmp_path) if n.startswith(".sp.tmp-")]
        staged.discard()
        staged.discard()  # once ended, a no-op
        with pytest.raises(RuntimeError, match="already committed or discarded"):
            staged.commit()
        assert mgr.checkpoints() == []
    assert os.listdir(tmp_path) == []


def test_a_bad_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with (
        safepoint.CheckpointManager(tmp_path) as mgr,
        pytest.raises(safepoint.ConfigError, match="single-file checkpoint name"),
    ):
        mgr.save_file("weights.pt", _writer(1.0))
    assert os.listdir(tmp_path) == []


_KILLED_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import h5py, numpy as np
    import safepoint

    mgr = safepoint.CheckpointManager(sys.argv[1])

    def write(path, value=1.0, die=False):
        with h5py.File(path, "w") as f:
            f["w"] = np.full(1 << 16, value, np.float32)
            f.flush()
            if die:
                os.kill(os.getpid(), signal.SIGKILL)

    mgr.save_file("w.h5", write, step=1)
    mgr.save_file("w.h5", lambda p: write(p, 2.0, die=True), step=2)
    print("not killed")
    """
)


def test_a_kill_mid_write_lists_nothing_partial(tmp_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_WRITE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -9, child.stderr
    assert [n for n in os.listdir(tmp_path) if n.startswith(".sp.tmp-")]  # the torn write
    with safepoint.CheckpointManager(tmp_path) as mgr:
        (ckpt,) = mgr.checkpoints()
        assert (ckpt.name, ckpt.step) == ("w.h5", 1)
        assert [v.ok for v in mgr.verify()] == [True]
        mgr.save_file("w.h5", _writer(3.0), step=3)  # the next writer cleans up
    assert sorted(os.listdir(tmp_path)) == ["safepoint-log.jsonl", "w.h5"]


def test_convert_takes_a_seq_no_save_in_flight_holds(tmp_path: Path) -> None:
    """``convert`` into a live root picks its seq with the manager's ``next_seq``: a
    background save that reserved a seq but has not committed yet keeps it."""
    src = tmp_path / "src"
    with safepoint.CheckpointManager(src) as m:
        m.save({"w": np.ones(3)}, step=1)
    gate, reached = threading.Event(), threading.Event()

    manifests: list[str] = []

    def slow(stage: str, target: str) -> None:
        if stage == "manifest" and threading.current_thread() is not threading.main_thread():
            manifests.append(target)
            if len(manifests) == 2:  # the second save, before its commit
                reached.set()
                assert gate.wait(30)

    root = tmp_path / "live"
    mgr = safepoint.CheckpointManager(LocalStorage(root, faults=slow), async_save=True)
    mgr.save({"w": np.zeros(3)}, step=1)  # seq 1, committed
    mgr.wait()
    mgr.save({"w": np.zeros(3)}, step=2)  # seq 2, held before its commit
    assert reached.wait(30)
    try:
        convert(str(src / "step-00000001"), str(root / "converted"), to="hdf5")
    finally:
        gate.set()
        mgr.close()
    seqs = sorted(c.seq for c in safepoint.CheckpointManager(root).checkpoints())
    assert seqs == [1, 2, 3]


def test_a_link_left_by_write_fn_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f["w"] = np.arange(3.0)
    before = outside.read_bytes()

    def link(path: str) -> None:
        os.symlink(outside, path)

    mgr = safepoint.CheckpointManager(tmp_path / "run")
    with pytest.raises(StorageError, match="a symbolic link"):
        mgr.save_file("w.h5", link, step=1)
    mgr.close()
    assert outside.read_bytes() == before
    assert mgr.checkpoints() == []
