"""A real loop killed (SIGKILL, SIGTERM) mid-epoch and resumed ends bit-identical.

Each scenario runs ``train_loop.py`` in subprocesses: once uninterrupted (the oracle),
then killed at a step and resumed from its last checkpoint. Parameters, optimizer
state (Adam's int-keyed moments and param groups), scheduler, GradScaler and the whole
loss sequence must be identical bit for bit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

import safepoint

LOOP = str(Path(__file__).with_name("train_loop.py"))
STEPS = 3 * 19  # EPOCHS * batches per epoch in train_loop.py
# Kill positions: some drawn at random (seeded, so a failure reproduces), and the
# boundaries that break naive resumes: the last batch of an epoch, the first of the next.
_rng = random.Random(20261128)
RANDOM_STEPS = sorted(_rng.sample([s for s in range(2, STEPS) if s % 5], 2))


def _run(root: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, LOOP, "--root", str(root), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _same(expected: Any, actual: Any, path: str = "") -> None:
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, np.ndarray):
        assert expected.dtype == actual.dtype and expected.shape == actual.shape, path
        assert expected.tobytes() == actual.tobytes(), f"{path}: bytes differ"
    elif isinstance(expected, dict):
        assert list(expected) == list(actual), path
        for k in expected:
            _same(expected[k], actual[k], f"{path}/{k}")
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            _same(e, a, f"{path}/{i}")
    elif isinstance(expected, float):
        assert expected.hex() == actual.hex(), f"{path}: {expected!r} != {actual!r}"
    else:
        assert expected == actual, path


def _final(out: Path) -> dict[str, Any]:
    ckpt = safepoint.CheckpointManager(out).latest()
    assert ckpt is not None
    return safepoint.load(ckpt.path)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("oracle")
    _run(base / "root", base / "out")
    result = _final(base / "out")
    assert len(result["history"]) == STEPS
    return result


def _kill_and_resume(tmp_path: Path, kill_at: int, workers: int, resume_workers: int) -> None:
    root, out = tmp_path / "root", tmp_path / "out"
    killed = _run(root, out, "--workers", str(workers), "--kill-at", str(kill_at), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"step {kill_at}\n" in killed.stdout and not out.exists()
    latest = safepoint.CheckpointManager(root).latest()
    assert latest is not None and latest.step == (kill_at - 1) // 5 * 5
    resumed = _run(root, out, "--workers", str(resume_workers))
    assert f"resumed {latest.name} at step {latest.step}" in resumed.stdout


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("kill_at", "workers"),
    # Step 21 resumes from step 20, the first batch of epoch 2 (19 batches per epoch).
    # RANDOM_STEPS[1] runs in test_resume_with_another_num_workers_is_exact.
    [(RANDOM_STEPS[0], 0), (21, 0), (RANDOM_STEPS[0], 2)],
)
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, oracle, kill_at, workers):
    _kill_and_resume(tmp_path, kill_at, workers, workers)
    _same(oracle, _final(tmp_path / "out"))


@pytest.mark.e2e
def test_resume_with_another_num_workers_is_exact(tmp_path, oracle):
    """The saved position counts batches the loop consumed, not those workers prefetched."""
    _kill_and_resume(tmp_path, RANDOM_STEPS[1], 2, 0)
    _same(oracle, _final(tmp_path / "out"))


@pytest.mark.e2e
def test_sigterm_mid_epoch_commits_a_checkpoint_and_the_resume_is_exact(tmp_path, oracle):
    """A scheduler signals the whole process group: DataLoader workers included."""
    root, out = tmp_path / "root", tmp_path / "out"
    # --sleep: slow enough to be signalled mid-epoch.
    command = [sys.executable, LOOP, "--root", str(root), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(
        [*command, "--sleep", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as under a batch scheduler
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "step 23":  # mid-epoch 2, between two scheduled saves
            os.killpg(proc.pid, signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "received SIGTERM; saving a checkpoint at the next safe point" in err
    latest = safepoint.CheckpointManager(root).latest()
    # Saved at the first safe point after the signal: step 23 or a little later.
    assert latest is not None and latest.step is not None and latest.step >= 23
    assert f"checkpoint {latest.name} committed" in err
    assert not out.exists()
    _run(root, out)
    _same(oracle, _final(out))
