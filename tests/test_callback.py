"""The framework-free ``safepoint.ModelCheckpoint``: Keras' decisions and messages for any loop."""

from __future__ import annotations

import os

import pytest

import safepoint


def _callback(root, **kwargs):
    messages: list[str] = []
    state = {"w": 0}
    cb = safepoint.ModelCheckpoint(
        str(root), state=state, verbose=1, print_fn=messages.append, **kwargs
    )
    return cb, state, messages


def test_every_epoch_saves_with_keras_messages(tmp_path):
    cb, state, messages = _callback(tmp_path, monitor="val_loss")
    for epoch in range(3):
        state["w"] = epoch
        cb.on_epoch_end(epoch, {"val_loss": 1.0 / (epoch + 1)})
    path = os.path.join(str(tmp_path), "step-00000002")
    assert messages[1] == f"Epoch 2: saving model to {path}"
    ckpts = cb.manager.checkpoints()
    assert [(c.step, c.epoch) for c in ckpts] == [(1, 1), (2, 2), (3, 3)]
    assert cb.manager.restore(checkpoint=2).state == {"w": 1}


def test_save_best_only_saves_improvements_and_says_so(tmp_path):
    cb, _, messages = _callback(tmp_path, monitor="val_acc", save_best_only=True)
    for epoch, acc in enumerate([0.5, 0.7, 0.6, 0.8]):
        cb.on_epoch_end(epoch, {"val_acc": acc, "loss": 1.0})
    root = str(tmp_path)
    assert messages == [
        f"Epoch 1: val_acc improved from None to 0.50000, saving model to {root}/step-00000001",
        f"Epoch 2: val_acc improved from 0.50000 to 0.70000, saving model to {root}/step-00000002",
        "Epoch 3: val_acc did not improve from 0.70000",
        f"Epoch 4: val_acc improved from 0.70000 to 0.80000, saving model to {root}/step-00000004",
    ]
    assert [c.step for c in cb.manager.checkpoints()] == [1, 2, 4]


def test_initial_value_threshold_and_best_on_disk_are_respected(tmp_path):
    cb, _, _ = _callback(
        tmp_path, monitor="val_loss", save_best_only=True, initial_value_threshold=0.3
    )
    cb.on_epoch_end(0, {"val_loss": 0.4})
    cb.on_epoch_end(1, {"val_loss": 0.2})
    assert [c.step for c in cb.manager.checkpoints()] == [2]
    cb.manager.close()
    # A restarted run compares against the best already on disk, not against None.
    again, _, messages = _callback(tmp_path, monitor="val_loss", save_best_only=True)
    again.on_epoch_end(2, {"val_loss": 0.25})
    assert messages == ["Epoch 3: val_loss did not improve from 0.20000"]


def test_save_freq_counts_batches_across_epochs(tmp_path):
    cb, _, messages = _callback(tmp_path, save_freq=3)
    for epoch in range(2):
        cb.on_epoch_begin(epoch)
        for batch in range(4):
            cb.on_batch_end(batch, {"loss": 0.1})
        assert cb.on_epoch_end(epoch, {"loss": 0.1}) is None
    assert [(c.step, c.epoch) for c in cb.manager.checkpoints()] == [(3, 1), (6, 2)]
    assert messages[0].startswith("Epoch 1: saving model to ")


def test_its_state_continues_the_count_after_a_resume(tmp_path):
    cb, state, _ = _callback(tmp_path, save_freq=4)
    state["cb"] = cb
    for batch in range(6):
        cb.on_batch_end(batch)
    mgr = cb.manager
    mgr.save(state, step=6)
    mgr.close()
    resumed, state2, _ = _callback(tmp_path, save_freq=4)
    state2["cb"] = resumed
    resumed.manager.restore(state2)
    assert (resumed.step, resumed.state_dict()["batches_since_save"]) == (6, 2)
    resumed.on_batch_end(6)
    assert resumed.on_batch_end(7) is not None  # 8 batches: the second save is due
    assert [c.step for c in resumed.manager.checkpoints()][-1] == 8


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(safepoint.ConfigError, match="save_freq"):
        _callback(tmp_path, save_freq=0)
    with pytest.raises(safepoint.ConfigError, match="state"):
        safepoint.ModelCheckpoint(str(tmp_path), state=None)
    cb, _, _ = _callback(tmp_path / "b", monitor="val_loss", save_best_only=True)
    with pytest.raises(safepoint.ConfigError, match="val_loss"):
        cb.on_epoch_end(0, {"loss": 0.5})


def test_a_failed_save_does_not_become_the_best(tmp_path, monkeypatch):
    cb, _, messages = _callback(tmp_path, monitor="val_loss", save_best_only=True)
    cb.on_epoch_end(0, {"val_loss": 0.5})
    real = cb.manager.save

    def failing(*args, **kwargs):
        raise safepoint.StorageError("the disk failed (injected)", stage="fsync")

    monkeypatch.setattr(cb.manager, "save", failing)
    with pytest.raises(safepoint.StorageError):
        cb.on_epoch_end(1, {"val_loss": 0.3})
    monkeypatch.setattr(cb.manager, "save", real)
    assert cb.best == 0.5
    cb.on_epoch_end(2, {"val_loss": 0.4})  # the best model so far: it must be saved
    assert [c.step for c in cb.manager.checkpoints()] == [1, 3]
    assert messages[-1].startswith("Epoch 3: val_loss improved from 0.50000 to 0.40000")


def test_a_failed_async_save_does_not_become_the_best(tmp_path, monkeypatch):
    mgr = safepoint.CheckpointManager(tmp_path, async_save=True)
    cb = safepoint.ModelCheckpoint(mgr, state={"w": 0}, monitor="val_loss", save_best_only=True)
    cb.on_epoch_end(0, {"val_loss": 0.5})
    mgr.wait()

    def failing(staged, name):
        raise safepoint.StorageError("the disk failed (injected)", stage="rename")

    monkeypatch.setattr(mgr.storage, "commit", failing)
    cb.on_epoch_end(1, {"val_loss": 0.3})  # fails in the background
    with pytest.raises(safepoint.StorageError, match="injected"):
        cb.on_epoch_end(2, {"val_loss": 0.4})
    monkeypatch.undo()
    assert cb.best == 0.5
    cb.on_epoch_end(2, {"val_loss": 0.4})
    mgr.wait()
    assert [c.step for c in mgr.checkpoints()] == [1, 3]
    mgr.close()


def test_a_resumed_run_finds_the_best_on_disk_with_a_manager_without_monitor(tmp_path):
    first = safepoint.ModelCheckpoint(
        safepoint.CheckpointManager(tmp_path), state={"w": 0}, monitor="val_loss",
        save_best_only=True,
    )  # fmt: skip
    first.on_epoch_end(0, {"val_loss": 0.3})
    first.on_epoch_end(1, {"val_loss": 0.2})
    first.manager.close()
    messages: list[str] = []
    again = safepoint.ModelCheckpoint(
        safepoint.CheckpointManager(tmp_path), state={"w": 1}, monitor="val_loss",
        save_best_only=True, verbose=1, print_fn=messages.append,
    )  # fmt: skip
    assert again.best == 0.2
    assert again.on_epoch_end(2, {"val_loss": 0.25}) is None
    assert messages == ["Epoch 3: val_loss did not improve from 0.20000"]
    assert [c.step for c in again.manager.checkpoints()] == [1, 2]


def test_batches_are_counted_once_by_the_policy(tmp_path):
    cb, _, _ = _callback(tmp_path, save_freq=4)
    for batch in range(6):
        cb.on_batch_end(batch)
    assert cb.policy.state_dict()["batches_since_save"] == 2
    assert cb.state_dict()["batches_since_save"] == 2
    cb.load_state_dict({**cb.state_dict(), "batches_since_save": 3})
    assert cb.policy.state_dict()["batches_since_save"] == 3
    assert cb.on_batch_end(6) is not None  # the fourth batch since the last save
