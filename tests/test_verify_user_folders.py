"""``verify`` judges checkpoints, not the user's own folders next to them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint.errors import IncompleteCheckpointError


def _root(tmp_path: Path) -> Path:
    mgr = safepoint.CheckpointManager(tmp_path / "run")
    mgr.save({"w": np.arange(4.0)}, step=1)
    mgr.close()
    (tmp_path / "run" / "exports").mkdir()
    (tmp_path / "run" / "exports" / "model.onnx").write_bytes(b"user data")
    return tmp_path / "run"


def test_a_user_folder_is_neither_a_failure_nor_deleted(tmp_path: Path) -> None:
    root = _root(tmp_path)
    mgr = safepoint.CheckpointManager(root)
    assert [(v.name, v.ok) for v in mgr.verify()] == [("step-00000001", True)]
    mgr.close()
    cli = [sys.executable, "-m", "safepoint.cli", "verify", str(root)]
    out = subprocess.run(cli, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 of 1 checkpoints verified" in out.stdout
    assert (root / "exports" / "model.onnx").read_bytes() == b"user data"


def test_a_checkpoint_that_lost_its_manifest_still_fails(tmp_path: Path) -> None:
    root = _root(tmp_path)
    (root / "step-00000001" / "manifest.json").unlink()
    mgr = safepoint.CheckpointManager(root)
    [result] = mgr.verify()
    mgr.close()
    assert isinstance(result.error, IncompleteCheckpointError)
    assert "never lists, loads or deletes it" in str(result.error)
    assert "next writer" not in str(result.error)  # it does not: that advice was false
    with pytest.raises(IncompleteCheckpointError, match="Move it out of the root"):
        safepoint.load(root / "step-00000001")
