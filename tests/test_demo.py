"""The main job: `safepoint demo` crashes with SIGKILL, resumes, and proves exactness."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")


def _demo(root: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "safepoint.cli", "demo", "--root", root, "--epochs", "15", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_crash_then_resume_is_bit_identical(tmp_path):
    root = str(tmp_path / "run")
    crashed = _demo(root, "--crash-at-epoch", "6")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert "Epoch 6: simulating a crash: SIGKILL" in crashed.stdout
    assert "Epoch 5: val_acc" in crashed.stdout
    assert "Epoch 7:" not in crashed.stdout
    names = sorted(os.listdir(root))
    assert "epoch-005" in names and "epoch-006" not in names

    resumed = _demo(root)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"Resuming from {os.path.join(root, 'epoch-005')}: 5 of 15 epochs done" in resumed.stdout
    assert "Epoch 1:" not in resumed.stdout and "Epoch 6: val_acc" in resumed.stdout
    assert "this run resumed at epoch 6; its final weights are bit-identical" in resumed.stdout
    # Keep(last=1, best=1): at most two checkpoints remain, the last among them.
    kept = [n for n in os.listdir(root) if n.startswith("epoch-")]
    assert "epoch-015" in kept and len(kept) <= 2


def test_demo_detects_a_resume_that_lost_the_rng(tmp_path, monkeypatch):
    """Negative control: restoring without the RNG state must be caught as a mismatch."""
    root = str(tmp_path / "run")
    assert _demo(root, "--crash-at-epoch", "4").returncode == -signal.SIGKILL
    # Replace the saved RNG state by a fresh process's: the resumed run then draws
    # different dropout masks and shuffles, and the final check must say so.
    script = (
        "import safepoint, random, numpy as np, torch, sys\n"
        "from safepoint.demo import build\n"
        f"mgr = safepoint.CheckpointManager({root!r}, name='epoch-{{epoch:03d}}')\n"
        "ck = mgr.restore()\n"
        "m, o = build(30, 7)\n"
        "random.seed(99); np.random.seed(99); torch.manual_seed(99)\n"
        "st = {'model': m, 'optimizer': o, 'rng': safepoint.RNGState(),\n"
        "      'history': ck.state['history']}\n"
        "m.load_state_dict(ck.state['model']); o.load_state_dict(ck.state['optimizer'])\n"
        "mgr.save(st, step=ck.step, epoch=ck.epoch, metrics=ck.metrics)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    resumed = _demo(root)
    assert resumed.returncode == 1
    assert "MISMATCH" in resumed.stderr
