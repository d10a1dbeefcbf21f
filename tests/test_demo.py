"""The main job: `safepoint demo` crashes with SIGKILL mid-epoch, resumes, proves exactness."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

import safepoint

PER_EPOCH = 38  # 380 training rows of the breast-cancer data, batch 10


def _demo(root: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "safepoint.cli",
            "demo",
            "--root",
            root,
            "--epochs",
            "15",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.e2e
def test_demo_crash_then_resume_is_bit_identical(tmp_path):
    root = str(tmp_path / "run")
    crashed = _demo(root, "--crash-at-epoch", "6")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # Killed at batch 19 of epoch 6 (global step 209); every 10 batches is saved.
    assert "Epoch 6: simulating a crash: SIGKILL at batch 19 of 38" in crashed.stdout
    assert "(last checkpoint: step-000200)" in crashed.stdout
    assert "Epoch 5: val_acc" in crashed.stdout
    assert "Epoch 7:" not in crashed.stdout
    latest = safepoint.CheckpointManager(root).latest()
    assert latest is not None and latest.name == "step-000200"
    saved = safepoint.load(latest.path)
    assert (saved["epoch"], saved["batch"]) == (5, 10)  # mid-epoch 6, after batch 10
    assert (saved["sampler"]["epoch"], saved["sampler"]["position"]) == (5, 100)

    resumed = _demo(root)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (
        f"Resuming from {os.path.join(root, 'step-000200')}: epoch 6, after batch 10 of 38"
        in resumed.stdout
    )
    assert "Epoch 1:" not in resumed.stdout and "Epoch 6: val_acc" in resumed.stdout
    assert (
        "this run resumed at epoch 6, batch 11; its final weights are bit-identical"
        in resumed.stdout
    )
    # Keep(last=1, best=1): at most two checkpoints remain, the last among them.
    kept = [n for n in os.listdir(root) if n.startswith("step-")]
    assert f"step-{15 * PER_EPOCH:06d}" in kept and len(kept) <= 2


@pytest.mark.e2e
def test_demo_detects_a_resume_that_lost_the_rng(tmp_path, monkeypatch):
    """Negative control: restoring without the RNG state must be caught as a mismatch."""
    root = str(tmp_path / "run")
    assert _demo(root, "--crash-at-epoch", "4").returncode == -signal.SIGKILL
    # Replace the saved generator states (RNGState's and the one the sampler keeps to
    # rewind the DataLoader's seed draw) by a fresh process's: the resumed run then
    # draws different dropout masks, and the final check must say so.
    script = (
        "import safepoint, safepoint.torch, random, numpy as np, torch\n"
        f"mgr = safepoint.CheckpointManager({root!r}, name='step-{{step:06d}}')\n"
        "ck = mgr.restore()\n"
        "random.seed(99); np.random.seed(99); torch.manual_seed(99)\n"
        "st = dict(ck.state, rng=safepoint.torch.RNGState())\n"
        "st['sampler'] = dict(st['sampler'], torch_rng=torch.get_rng_state())\n"
        "mgr.save(st, step=ck.step, epoch=ck.epoch, metrics=ck.metrics)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    resumed = _demo(root)
    assert resumed.returncode == 1
    assert "MISMATCH" in resumed.stderr
