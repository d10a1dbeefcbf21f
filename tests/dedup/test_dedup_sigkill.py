"""Crash safety of dedup (issue 15 item 3): SIGKILL at random points of saves,
retention and blob collection; then every listed checkpoint restores bit-exactly,
verify passes and ``safepoint gc`` frees nothing a checkpoint references."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint.cli.commands import main as cli
from safepoint.ondisk.names import BLOBS

sys.path.insert(0, str(Path(__file__).parent))
from dedup_kill_worker import state_for

WORKER = Path(__file__).parent / "dedup_kill_worker.py"


def _kill_loop(root: Path, rounds: int, *, async_save: bool, seed: int) -> None:
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = 0
    for _ in range(rounds):
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(root), str(start), "1" if async_save else "0"],
            env=env,
        )
        deadline = time.monotonic() + 20
        while not (root / BLOBS).is_dir() and time.monotonic() < deadline:
            time.sleep(0.02)  # interpreter start-up; then kill at a random point of saves
        time.sleep(rng.uniform(0.05, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _check(root)
        if rng.random() < 0.5 and root.is_dir():
            assert cli(["gc", str(root)]) == 0
            _check(root)
        listed = safepoint.CheckpointManager(root).checkpoints()
        start = (listed[-1].step + 1) if listed else start
    assert start >= 1  # the children did save between the kills


def _check(root: Path) -> None:
    with safepoint.CheckpointManager(root) as mgr:
        for ckpt in mgr.checkpoints():
            got = safepoint.load(root / ckpt.name)
            want = state_for(int(ckpt.step))
            for key, arr in want.items():
                assert got[key].dtype == arr.dtype and np.array_equal(got[key], arr), ckpt.name
        assert all(v.error is None for v in mgr.verify())


@pytest.mark.e2e
def test_sigkill_during_dedup_saves(tmp_path: Path) -> None:
    _kill_loop(tmp_path / "run", 4, async_save=False, seed=1)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_sigkill_loop_dedup_long(tmp_path: Path, async_save: bool) -> None:
    _kill_loop(tmp_path / "run", 25, async_save=async_save, seed=7)
