"""A checkpoint is not a root (issue 10 item 12): the manager names the folder to use."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import safepoint


def test_a_checkpoint_directory_as_root_is_refused_with_its_parent(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as mgr:
        ckpt = mgr.save({"w": np.ones(3, np.float32)}, step=1)
    before = sorted(os.listdir(ckpt.path))
    with pytest.raises(safepoint.ConfigError) as info:
        safepoint.CheckpointManager(ckpt.path)
    assert repr(str(root)) in str(info.value) and "checkpoint directory" in str(info.value)
    assert sorted(os.listdir(ckpt.path)) == before  # nothing written inside it


def test_a_single_file_checkpoint_as_root_is_refused(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")

    def write(path: str) -> None:
        with h5py.File(path, "w") as f:
            f["w"] = np.ones(3)

    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save_file("w.h5", write, step=1, epoch=1, metrics={}, layout="keras-legacy-h5-weights")
    with pytest.raises(safepoint.ConfigError, match="single-file checkpoint") as info:
        safepoint.CheckpointManager(tmp_path / "w.h5")
    assert repr(str(tmp_path)) in str(info.value)


def test_a_foreign_manifest_json_is_not_a_checkpoint(tmp_path: Path) -> None:
    """A web app's manifest.json next to (or above) a run root is not safepoint's."""
    (tmp_path / "manifest.json").write_text('{"name": "my app", "version": "1"}')
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"w": np.ones(3, np.float32)}, step=1)
    with safepoint.CheckpointManager(tmp_path, name="top-{step}") as mgr:
        mgr.save({"w": np.ones(3, np.float32)}, step=2)
