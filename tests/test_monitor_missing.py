"""A manager ``monitor`` that the saves never carry is refused before anything is
deleted (issue 10 item 3)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import safepoint


def state(value: float) -> dict[str, object]:
    return {"w": np.full(4, value, dtype=np.float32)}


def test_a_monitor_missing_from_the_metrics_is_refused_before_any_io(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root, keep=safepoint.Keep(last=1)) as plain:
        plain.save(state(0.0), step=1, metrics={"val_accuracy": 0.99})  # the real best
    before = sorted(os.listdir(root))
    mgr = safepoint.CheckpointManager(
        root, monitor="val_acc", mode="max", keep=safepoint.Keep(best=1, last=1)
    )
    with pytest.raises(safepoint.ConfigError) as info:
        mgr.save(state(1.0), step=2, metrics={"val_accuracy": 0.5, "loss": 0.3})
    text = str(info.value)
    assert "'val_acc'" in text and "Did you mean 'val_accuracy'" in text
    assert sorted(os.listdir(root)) == before  # nothing written, nothing deleted
    mgr.close()


def test_a_save_without_the_monitor_is_allowed_once_a_checkpoint_carries_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    with safepoint.CheckpointManager(
        root, monitor="val_loss", keep=safepoint.Keep(best=1, last=1)
    ) as mgr:
        mgr.save(state(0.0), step=1, metrics={"val_loss": 0.1, "loss": 0.2})
        mgr.save(state(1.0), step=2, metrics={"loss": 0.1})  # mid-epoch: not ranked
        mgr.save(state(2.0), step=3, metrics={"loss": 0.05})
        assert [c.step for c in mgr.checkpoints()] == [1, 3]
    # A restarted manager finds the metric in the root.
    with safepoint.CheckpointManager(
        root, monitor="val_loss", keep=safepoint.Keep(best=1, last=1)
    ) as again:
        again.save(state(3.0), step=4, metrics={"loss": 0.01})
        assert again.best() is not None and again.best().step == 1  # type: ignore[union-attr]


def test_the_keras_callback_path_is_checked_too(tmp_path: Path) -> None:

    pytest.importorskip("h5py")
    import h5py

    mgr = safepoint.CheckpointManager(
        tmp_path, monitor="val_acc", mode="max", keep=safepoint.Keep(best=1)
    )

    def write(path: str) -> None:
        with h5py.File(path, "w") as f:
            f["w"] = np.ones(3)

    with pytest.raises(safepoint.ConfigError, match="val_accuracy"):
        mgr.save_file("w.h5", write, step=1, epoch=1, metrics={"val_accuracy": 1.0}, layout="h5")
    assert os.listdir(tmp_path) == []
    mgr.close()
