"""Family 11: async saves keep the state at call time and never lose an error or a save.

* the model mutated right after ``save()`` returns: the checkpoint holds the values
  at call time;
* a failure in the background surfaces on ``wait()`` (or on the next ``save()``) and
  the failed checkpoint is never listed;
* the interpreter exiting right after ``save()`` still commits it, and a background
  failure nobody waited for is reported on stderr;
* SIGKILL during a background save loses nothing that was committed.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from faultkit import MiB, Oracle, digest, expected_digest, fork, make_state

import safepoint
from safepoint_testing import fail_at, faulty_manager

SEED = 31
HERE = os.path.dirname(os.path.abspath(__file__))
NBYTES = 2 * MiB


def test_mutation_after_save_returns_is_not_saved(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path / "run", async_save=True)
    state = make_state(SEED, 1, NBYTES)
    want = digest(state)
    mgr.save(state, step=1)
    state["model"]["w"][:] = -1.0  # the training step right after save() returns
    state["optimizer"]["exp_avg"] *= 3
    mgr.wait()
    mgr.close()
    assert digest(safepoint.CheckpointManager(tmp_path / "run").restore().state) == want


@pytest.mark.parametrize("stage", ["write", "fsync", "manifest", "rename", "dir-fsync"])
def test_background_error_surfaces_and_nothing_is_listed(tmp_path, stage):
    root = tmp_path / "run"
    sync = safepoint.CheckpointManager(root)
    sync.save(make_state(SEED, 1, NBYTES), step=1)
    sync.close()
    mgr = faulty_manager(root, fail_at(stage, times=None), async_save=True)
    mgr.save(make_state(SEED, 2, NBYTES), step=2)
    with pytest.raises(safepoint.StorageError) as info:
        mgr.wait()
    assert info.value.errno == errno.EIO
    mgr.close()
    Oracle(SEED, NBYTES, returned=1).check(root)
    # Not waiting: the next save() raises the background error instead.
    mgr = faulty_manager(root, fail_at(stage, times=None), async_save=True)
    mgr.save(make_state(SEED, 2, NBYTES), step=2)
    with pytest.raises(safepoint.StorageError):
        time.sleep(0.05)
        mgr.save(make_state(SEED, 3, NBYTES), step=3)
    mgr.close()  # the error was reported once, by save(); step 3 was never started
    Oracle(SEED, NBYTES, returned=1).check(root)


def _script(root, fail: bool) -> str:
    return textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]
        import time
        from faultkit import make_state
        from safepoint_testing import eio, fail_at, faulty_manager

        def slow(stage, target):
            time.sleep(0.3)
            if {fail!r}:
                eio(stage, target)

        mgr = faulty_manager({str(root)!r}, fail_at("rename", slow, times=None), async_save=True)
        mgr.save(make_state({SEED}, 1, {NBYTES}), step=1)
        """
    )


def test_exit_right_after_save_commits_it(tmp_path):
    root = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", _script(root, fail=False)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    Oracle(SEED, NBYTES, returned=1).check(root)


def test_exit_reports_a_background_failure(tmp_path):
    root = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", _script(root, fail=True)], capture_output=True, text=True
    )
    assert "injected" in done.stderr or "StorageError" in done.stderr, done.stderr
    assert safepoint.CheckpointManager(root).checkpoints() == []


def test_sigkill_during_async_saves(tmp_path):
    root = tmp_path / "run"
    r, w = os.pipe()

    def child() -> None:
        mgr = safepoint.CheckpointManager(root, async_save=True, keep=safepoint.Keep(last=2))
        for step in range(1, 10_000):
            mgr.save(make_state(SEED, step, NBYTES), step=step)
            os.write(w, f"{step}\n".encode())

    for _ in range(5):
        pid = fork(child)
        time.sleep(0.4)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mgr = safepoint.CheckpointManager(root)
        for v in mgr.verify():
            assert v.ok, v
        got = mgr.restore(missing_ok=True)
        if got is not None:
            assert digest(got.state) == expected_digest(SEED, got.step, NBYTES)
        assert os.listdir(root)
    os.close(w)
    os.close(r)
