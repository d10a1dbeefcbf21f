"""safepoint.ModelCheckpoint in plain loops: real epochs, and the manager's monitor."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint.errors import ConfigError
from safepoint.storage import runlog
from safepoint.storage.local import LocalStorage

DOC = Path(__file__).resolve().parents[1] / "docs" / "torch.md"


def _saved_epochs(root: Path) -> list[tuple[int, int | None]]:
    lines = runlog.read(LocalStorage(str(root)))
    return [(e["step"], e["epoch"]) for e in lines if e["event"] == "save"]


def _expected(epochs: int, batches: int, every: int) -> list[tuple[int, int]]:
    """(step, 1-based epoch of that batch) for a save every ``every`` batches."""
    return [(s, (s - 1) // batches + 1) for s in range(every, epochs * batches + 1, every)]


def _loop(root: Path, *, epoch_hook: bool, epochs: int = 3, batches: int = 7) -> None:
    state: dict[str, Any] = {"w": np.zeros(2), "epoch": 0}
    with safepoint.CheckpointManager(root) as mgr:
        cb = safepoint.ModelCheckpoint(mgr, state=state, save_freq=5)
        state["checkpointing"] = cb
        for epoch in range(epochs):
            if epoch_hook:
                cb.on_epoch_begin(epoch)
            for batch in range(batches):
                state["w"] += 1
                cb.on_batch_end(batch, {"loss": 1.0 / (1 + batch)})
            state["epoch"] = epoch + 1


def test_on_batch_end_only_loop_records_the_real_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="safepoint")
    _loop(tmp_path, epoch_hook=False)
    assert _saved_epochs(tmp_path) == _expected(3, 7, 5)
    assert caplog.text.count("call on_epoch_begin(epoch)") == 1


def test_on_epoch_begin_gives_exact_epochs_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="safepoint")
    _loop(tmp_path, epoch_hook=True)
    assert _saved_epochs(tmp_path) == _expected(3, 7, 5)
    assert "on_epoch_begin" not in caplog.text


def test_on_epoch_end_starts_the_next_epoch_for_mid_epoch_saves(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        cb = safepoint.ModelCheckpoint(mgr, state={"w": np.zeros(1)}, save_freq=3)
        for epoch in range(2):
            for batch in range(4):
                cb.on_batch_end(batch, {"loss": 0.5})
            cb.on_epoch_end(epoch, {"loss": 0.5})
    assert _saved_epochs(tmp_path) == [(3, 1), (6, 2)]


@pytest.mark.e2e  # real training: the docs' loop, 4 epochs
def test_the_torch_doc_loop_records_real_epochs(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    text = DOC.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None and "every_10.on_batch_end" in code.group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code.group(1), str(DOC), "exec"), {"__name__": "doc_loop"})
    finally:
        os.chdir(cwd)
        from safepoint import preemption

        guard = preemption.active()
        if guard is not None:
            guard.remove()
    saved = _saved_epochs(tmp_path / "runs" / "torch_loop")
    # 4 epochs of 32 batches, a checkpoint every 10 batches, then the final state.
    assert saved == [*_expected(4, 32, 10), (128, 4)]


# -- the manager's monitor ---------------------------------------------------------------
def test_callback_uses_the_managers_monitor_and_mode(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path, monitor="score", mode="max") as mgr:
        cb = safepoint.ModelCheckpoint(mgr, state={"w": np.zeros(1)}, save_best_only=True)
        assert (cb.monitor, cb.mode) == ("score", "max")
        saved = [cb.on_epoch_end(e, {"score": s}) is not None for e, s in enumerate([1, 3, 2])]
    assert saved == [True, True, False]


def test_callback_monitor_agreeing_with_the_manager_is_accepted(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path, monitor="val_acc") as mgr:
        cb = safepoint.ModelCheckpoint(mgr, state={}, monitor="val_acc", mode="max")
        assert cb.mode == "max"


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [({"monitor": "val_loss"}, "monitor='val_loss'"), ({"mode": "min"}, "mode='min'")],
)
def test_callback_contradicting_the_manager_is_refused(
    tmp_path: Path, kwargs: dict[str, str], what: str
) -> None:
    with (
        safepoint.CheckpointManager(tmp_path, monitor="val_acc") as mgr,
        pytest.raises(ConfigError, match="disagree on what is best") as err,
    ):
        safepoint.ModelCheckpoint(mgr, state={}, **kwargs)  # type: ignore[arg-type]
    assert what in str(err.value) and "monitor='val_acc'" in str(err.value)


def test_without_a_manager_monitor_the_keras_default_stays(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        assert safepoint.ModelCheckpoint(mgr, state={}).monitor == "val_loss"
    cb = safepoint.ModelCheckpoint(tmp_path / "other", state={})
    assert (cb.monitor, cb.manager.monitor) == ("val_loss", "val_loss")


def test_a_monitored_int_beyond_float_is_a_skip_not_a_crash(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path, monitor="val_loss") as mgr:
        cb = safepoint.ModelCheckpoint(mgr, state={"w": np.zeros(1)}, save_best_only=True)
        assert cb.on_epoch_end(0, {"val_loss": 0.5}) is not None
        assert cb.on_epoch_end(1, {"val_loss": 10**400}) is None
    skips = [e for e in runlog.read(LocalStorage(str(tmp_path))) if e["event"] == "skip"]
    assert "an int of 1329 bits" in skips[0]["reason"]


def test_a_constant_batch_number_is_not_taken_for_new_epochs(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        cb = safepoint.ModelCheckpoint(mgr, state={"w": np.zeros(1)}, save_freq=2)
        for _ in range(4):
            cb.on_batch_end(0, {"loss": 0.5})
    assert _saved_epochs(tmp_path) == [(2, 1), (4, 1)]
