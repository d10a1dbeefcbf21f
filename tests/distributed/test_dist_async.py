"""Async multi-rank saves and a rank 0 killed at its commit, with real gloo processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed")

from test_dist_fsdp import SRC, launch, run, same


def _listed(root: Path) -> list[str]:
    return sorted(os.listdir(root)) if root.exists() else []


@pytest.mark.e2e
def test_async_save_is_the_state_at_save_time_and_restores_exactly(tmp_path: Path) -> None:
    root, out = tmp_path / "ckpt", tmp_path / "saved"
    run("async", 2, root, out)
    assert not any(Path(f"{out}.err{r}").exists() for r in range(2))
    assert [n for n in _listed(root) if n.startswith("step-")] == ["step-00000002"]
    # the ranks trained on (and ran collectives) while it was written: it still holds
    # the state of the save() call
    run("load", 2, root, tmp_path / "loaded.npz")
    same(Path(f"{out}.npz"), tmp_path / "loaded.npz")


@pytest.mark.e2e
def test_failed_background_write_raises_the_same_error_on_every_rank(tmp_path: Path) -> None:
    root, out = tmp_path / "ckpt", tmp_path / "saved"
    run("async", 2, root, out, FAIL_WRITE="1")
    errors = [Path(f"{out}.err{r}").read_text() for r in range(2)]
    assert errors[0] == errors[1], errors
    assert "rank 1" in errors[0] and "injected" in errors[0], errors[0]
    assert not [n for n in _listed(root) if n.startswith(("step-", ".sp.tmp-"))]


@pytest.mark.e2e
@pytest.mark.parametrize("at", ["commit", pytest.param("write", marks=pytest.mark.slow)])
def test_rank0_killed_mid_save_leaves_latest_and_gc_cleans_up(tmp_path: Path, at: str) -> None:
    root, out = tmp_path / "ckpt", tmp_path / "hang"
    procs = launch("hangcommit", 2, root, out, SP_TIMEOUT="5", KILL_AT=at)
    deadline = time.monotonic() + 60
    while not Path(f"{out}.ready0").exists():
        assert time.monotonic() < deadline and procs[0].poll() is None
        time.sleep(0.1)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].communicate(timeout=60)
    text, _ = procs[1].communicate(timeout=60)
    err = Path(f"{out}.err1").read_text()
    assert float(err.split()[0]) < 30, err  # the survivor raised within the timeout
    names = _listed(root)
    assert [n for n in names if n.startswith("step-")] == ["step-00000002"], (names, text)
    leftovers = [n for n in names if n.startswith(".sp.tmp-")]
    assert leftovers, names  # the staged checkpoint (at commit: its manifest), never renamed
    gc = subprocess.run(
        [sys.executable, "-m", "safepoint.cli", "gc", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert gc.returncode == 0, gc.stdout + gc.stderr
    assert not [n for n in _listed(root) if n.startswith(".sp.tmp-")], _listed(root)
    # a new run on the same root saves, and its checkpoint is the latest and loads
    run("snapshot", 2, root, tmp_path / "new.npz", SP_STEP="6")
    import numpy as np

    import safepoint

    assert safepoint.CheckpointManager(root, run_log=False).latest().name == "step-00000006"  # type: ignore[union-attr]
    tree = safepoint.load(root / "step-00000006")
    saved = np.load(tmp_path / "new.npz")
    for key in ("0.weight", "2.weight", "2.bias"):
        assert np.array_equal(tree["model"][key], saved[f"/model/{key}"]), key
