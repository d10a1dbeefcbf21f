"""Names near NAME_MAX and huge counters (issue 10 item 9b): what the name check
accepts can be staged, replaced and pruned; what cannot be stored is refused first."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import safepoint


def state(value: float) -> dict[str, object]:
    return {"w": np.full(4, value, dtype=np.float32)}


@pytest.mark.parametrize("length", [236, 250, 255])
def test_names_up_to_255_bytes_save_replace_and_prune(tmp_path: Path, length: int) -> None:
    root = tmp_path / "run"
    prefix = "n" * (length - 4)
    with safepoint.CheckpointManager(
        root, name=prefix + "{step:04d}", keep=safepoint.Keep(last=1)
    ) as mgr:
        mgr.save(state(1.0), step=1)
        mgr.save(state(2.0), step=1)  # same name: replaced through a trash entry
        mgr.save(state(3.0), step=2)  # retention removes the first
        assert [c.name for c in mgr.checkpoints()] == [prefix + "0002"]
    assert sorted(os.listdir(root)) == sorted(["safepoint-log.jsonl", prefix + "0002"])


def test_a_255_byte_single_file_name_commits(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")

    name = "w" * (255 - 3) + ".h5"

    def write(path: str) -> None:
        with h5py.File(path, "w") as f:
            f["w"] = np.ones(3)

    with safepoint.CheckpointManager(tmp_path, keep=safepoint.Keep(last=1)) as mgr:
        for step in (1, 2):  # the second replaces the first under the same name
            mgr.save_file(
                name,
                write,
                step=step,
                epoch=step,
                metrics={},
                layout="keras-legacy-h5-weights",
            )
        assert [c.name for c in mgr.checkpoints()] == [name]


@pytest.mark.parametrize("field", ["step", "epoch"])
def test_huge_counters_are_a_config_error_before_any_io(tmp_path: Path, field: str) -> None:
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root, name="fixed")
    with pytest.raises(safepoint.ConfigError, match="2\\*\\*63"):
        mgr.save(state(1.0), **{field: 10**5000})
    with pytest.raises(safepoint.ConfigError, match="2\\*\\*63"):
        mgr.save(state(1.0), **{field: 2**63})
    assert not root.exists()
    mgr.save(state(1.0), **{field: 2**63 - 1})
    assert mgr.restore() is not None
    mgr.close()
