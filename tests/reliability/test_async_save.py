"""Async saves: the state at call time, every error reported, every save committed.

Async saves (``async_save=True``): snapshot semantics, errors, exit, order, memory.

Functional checks only; how long a save stalls training is measured by
``bench/async_stall.py``, never asserted here.

Family 11: async saves keep the state at call time and never lose an error or a save.

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
from pathlib import Path

import numpy as np
import pytest
from faultkit import MiB, Oracle, digest, expected_digest, fork, make_state

import safepoint
from safepoint_testing import Faults, fail_at, faulty_manager

torch = pytest.importorskip("torch")

SRC = str(Path(__file__).resolve().parents[2] / "src")
TESTS = str(Path(__file__).resolve().parents[1])  # safepoint_testing, for the children


def model_state(seed: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(256, 1024, generator=gen),
            "b": torch.randn(1024, generator=gen).bfloat16(),
        },
        "np": np.arange(1000, dtype=np.int64) * seed,
        "step": seed,
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_mutation_after_save_does_not_change_what_is_saved(tmp_path: Path) -> None:
    state = model_state(1)
    expected_w = state["model"]["w"].clone()  # type: ignore[index]
    expected_np = state["np"].copy()  # type: ignore[union-attr]
    with safepoint.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(state, step=1)
        state["model"]["w"].add_(1.0)  # type: ignore[index]
        state["model"]["w"][0, 0] = float("nan")  # type: ignore[index]
        state["np"][:] = -1  # type: ignore[index]
        mgr.wait()
        ckpt = mgr.restore()
    assert ckpt is not None and ckpt.step == 1
    assert torch.equal(ckpt.state["model"]["w"], expected_w)
    assert np.array_equal(ckpt.state["np"], expected_np)


def test_background_error_surfaces_on_wait_and_keeps_previous_latest(tmp_path: Path) -> None:
    faults = Faults()
    with faulty_manager(tmp_path, faults, async_save=True) as mgr:
        mgr.save(model_state(1), step=1)
        mgr.wait()
        faults.arm("write")
        mgr.save(model_state(2), step=2)  # returns: the failure happens in the background
        with pytest.raises(safepoint.StorageError, match="write"):
            mgr.wait()
        mgr.wait()  # reported once
        latest = mgr.latest()
        assert latest is not None and latest.step == 1
        ckpt = mgr.restore()
        assert ckpt is not None
        assert torch.equal(ckpt.state["model"]["w"], model_state(1)["model"]["w"])  # type: ignore[index]
        assert [c.step for c in mgr.checkpoints()] == [1]
        mgr.save(model_state(3), step=3)  # the next save works
    assert [c.step for c in safepoint.CheckpointManager(tmp_path).checkpoints()] == [1, 3]


@pytest.mark.parametrize("stage", ["fsync", "manifest", "rename"])
def test_background_error_surfaces_on_next_save(tmp_path: Path, stage: str) -> None:
    faults = Faults()
    mgr = faulty_manager(tmp_path, faults, async_save=True)
    mgr.save(model_state(1), step=1)
    mgr.wait()
    faults.arm(stage)
    mgr.save(model_state(2), step=2)
    with pytest.raises(safepoint.StorageError, match=stage):
        mgr.save(model_state(3), step=3)
    mgr.save(model_state(4), step=4)
    mgr.close()
    assert [c.step for c in mgr.checkpoints()] == [1, 4]
    assert all(v.ok for v in mgr.verify())


def _run_child(code: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([SRC, TESTS, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.e2e
def test_process_exiting_right_after_async_save_commits_it(tmp_path: Path) -> None:
    proc = _run_child(
        f"""
        import torch, safepoint
        mgr = safepoint.CheckpointManager({str(tmp_path)!r}, async_save=True)
        state = {{"w": torch.arange(8 << 20, dtype=torch.float32)}}
        mgr.save(state, step=7)
        state["w"].zero_()
        """
    )  # no wait(), no close(): the script simply ends
    assert proc.returncode == 0, proc.stderr
    mgr = safepoint.CheckpointManager(tmp_path)
    assert [c.step for c in mgr.checkpoints()] == [7]
    ckpt = mgr.restore()
    assert ckpt is not None
    assert torch.equal(ckpt.state["w"], torch.arange(8 << 20, dtype=torch.float32))


@pytest.mark.e2e
def test_failure_in_flight_at_exit_is_reported(tmp_path: Path) -> None:
    proc = _run_child(
        f"""
        import numpy as np
        from safepoint_testing import fail_at, faulty_manager

        faults = fail_at("fsync", times=None)
        mgr = faulty_manager({str(tmp_path)!r}, faults, async_save=True)
        mgr.save({{"w": np.ones(1000)}}, step=1)
        """
    )
    assert "NOT committed" in proc.stderr, proc.stderr
    assert safepoint.CheckpointManager(tmp_path).checkpoints() == []


def test_two_quick_saves_commit_in_order(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path, async_save=True) as mgr:
        first = mgr.save(model_state(1), step=10)
        second = mgr.save(model_state(2), step=20)  # waits for the first commit
        assert (first.seq, second.seq) == (1, 2)
        mgr.wait()
        listed = mgr.checkpoints()
        assert [(c.step, c.seq) for c in listed] == [(10, 1), (20, 2)]
        assert listed[0].created <= listed[1].created
        ckpt = mgr.restore()
    assert ckpt is not None and ckpt.step == 20
    assert torch.equal(ckpt.state["model"]["w"], model_state(2)["model"]["w"])  # type: ignore[index]


@pytest.mark.heavy
def test_staging_is_reused_without_rss_growth(tmp_path: Path) -> None:
    state = {"w": torch.randn(8 << 20), "v": torch.randn(1 << 20)}  # 36 MiB
    size = 36 << 20
    with safepoint.CheckpointManager(tmp_path, async_save=True, keep=safepoint.Keep(last=1)) as mgr:
        for step in range(3):
            mgr.save(state, step=step)
        mgr.wait()
        arena = mgr._staging._arena
        warm = rss_bytes()
        for step in range(3, 23):
            state["w"].add_(1.0)
            mgr.save(state, step=step)
        mgr.wait()
        grown = rss_bytes() - warm
        assert mgr._staging._arena is arena  # the same memory every time
    assert grown < size // 4, f"RSS grew by {grown / 2**20:.1f} MiB over 20 saves"


def test_state_over_the_staging_cap_is_saved_synchronously(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with safepoint.CheckpointManager(tmp_path, async_save=True, max_staging_bytes=1024) as mgr:
        ckpt = mgr.save({"w": np.ones(4096)}, step=1)
        assert [c.name for c in mgr.checkpoints()] == [ckpt.name]  # committed on return
        assert mgr._staging.nbytes == 0
    assert "max_staging_bytes" in caplog.text


def test_bad_async_arguments_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(safepoint.ConfigError, match="max_staging_bytes"):
        safepoint.CheckpointManager(tmp_path, async_save=True, max_staging_bytes=-1)
    with pytest.raises(safepoint.ConfigError, match="async_save"):
        safepoint.CheckpointManager(tmp_path, async_save="yes")  # type: ignore[arg-type]


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


@pytest.mark.e2e
def test_exit_right_after_save_commits_it(tmp_path):
    root = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", _script(root, fail=False)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    Oracle(SEED, NBYTES, returned=1).check(root)


@pytest.mark.e2e
def test_exit_reports_a_background_failure(tmp_path):
    root = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", _script(root, fail=True)], capture_output=True, text=True
    )
    assert "injected" in done.stderr or "StorageError" in done.stderr, done.stderr
    assert safepoint.CheckpointManager(root).checkpoints() == []


@pytest.mark.e2e
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
