"""Regressions found in review: each test failed before its fix."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys

import numpy as np
import pytest

import safepoint
from safepoint.cli import main
from safepoint.storage.local import LocalStorage


class LogFails(LocalStorage):
    """A root whose run log cannot be appended to (a full disk for the log only)."""

    def append_log(self, line: str) -> None:
        raise safepoint.StorageError("log failed", errno=errno.ENOSPC, stage="log")


def test_a_run_log_failure_never_fails_a_committed_save(tmp_path, caplog):
    mgr = safepoint.CheckpointManager(LogFails(tmp_path / "run"), keep=safepoint.Keep(last=1))
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        first = mgr.save({"x": np.ones(3)}, step=1)
        second = mgr.save({"x": np.zeros(3)}, step=2)
    assert (first.step, second.step) == (1, 2)
    # retention still ran after the failed log line: only the newest remains
    assert [c.name for c in mgr.checkpoints()] == [second.name]
    assert "could not write the run log" in caplog.text


@pytest.mark.parametrize("which", [5, "step-00000005"])
def test_missing_ok_covers_steps_and_names(tmp_path, which):
    mgr = safepoint.CheckpointManager(tmp_path / "run")
    assert mgr.restore(checkpoint=which, missing_ok=True) is None
    with pytest.raises(safepoint.CheckpointNotFoundError):
        mgr.restore(checkpoint=which)
    mgr.save({"x": 1}, step=1)
    assert mgr.restore(checkpoint=which, missing_ok=True) is None
    assert mgr.restore(checkpoint=1).state == {"x": 1}


class Counter:
    def __init__(self, fail: bool = False) -> None:
        self.value = 0
        self.fail = fail

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.fail:
            raise ValueError("refusing this state")
        self.value = state["value"]


def test_a_failed_restore_names_what_was_already_loaded(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path / "run")
    a, b = Counter(), Counter()
    a.value = b.value = 7
    mgr.save({"a": a, "b": b}, step=1)
    target = {"a": Counter(), "b": Counter(fail=True)}
    with pytest.raises(
        safepoint.StateMismatchError,
        match=r"Already loaded before this "
        r"failure: \['a'\]",
    ) as exc:
        mgr.restore(target)
    assert exc.value.mismatched == ["b"]
    with pytest.raises(safepoint.StateMismatchError, match="Nothing else was loaded"):
        mgr.restore({"b": Counter(fail=True)})


def test_convert_into_a_live_root_takes_the_next_seq_and_the_lock(tmp_path):
    pytest.importorskip("h5py")
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    for step in (1, 2):
        mgr.save({"w": np.full(4, step, np.float32)}, step=step)
    # the manager holds the writer lock: converting into its root from another process
    # (the CLI) must wait its turn (writers of one process share the lock, issue 10 item 8)
    argv = ["convert", str(root / "step-00000001"), "--to", "hdf5", "--out", str(root / "copy")]
    other = subprocess.run([sys.executable, "-m", "safepoint.cli", *argv], capture_output=True)
    assert other.returncode == safepoint.StorageError.exit_code, other.stderr
    mgr.close()
    assert (
        main(["convert", str(root / "step-00000001"), "--to", "hdf5", "--out", str(root / "copy")])
        == 0
    )
    listed = safepoint.CheckpointManager(root).checkpoints()
    assert [(c.name, c.seq) for c in listed] == [
        ("step-00000001", 1),
        ("step-00000002", 2),
        ("copy", 3),
    ]


def test_convert_defaults_to_the_current_directory(tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    root = tmp_path / "run"
    safepoint.CheckpointManager(root).save({"w": np.ones(2)}, step=1)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["convert", str(root / "step-00000001"), "--to", "hdf5"]) == 0
    assert (work / "step-00000001-hdf5" / "manifest.json").exists()
    assert sorted(p.name for p in root.iterdir()) == ["safepoint-log.jsonl", "step-00000001"]


def test_an_hdf5_checkpoint_without_h5py_is_incompatible_and_latest_falls_back(
    tmp_path, monkeypatch
):
    pytest.importorskip("h5py")
    root = tmp_path / "run"
    safepoint.CheckpointManager(root).save({"x": np.ones(2)}, step=1)
    safepoint.CheckpointManager(root, format="hdf5").save({"x": np.zeros(2)}, step=2)
    from safepoint import formats

    real_get = formats.get

    def no_h5py(name: str):
        if name == "hdf5":
            raise safepoint.ConfigError("The 'hdf5' format needs h5py.")
        return real_get(name)

    monkeypatch.setattr(formats, "get", no_h5py)
    mgr = safepoint.CheckpointManager(root)
    with pytest.raises(safepoint.IncompatibleCheckpointError, match="needs h5py"):
        mgr.restore(checkpoint=2)
    np.testing.assert_array_equal(mgr.restore().state["x"], np.ones(2))


def test_a_manager_dropped_without_close_releases_the_root(tmp_path):
    import gc

    root = tmp_path / "run"
    safepoint.CheckpointManager(root).save({"x": 1}, step=1)  # never closed
    gc.collect()
    assert safepoint.CheckpointManager(root).save({"x": 2}, step=2).step == 2
