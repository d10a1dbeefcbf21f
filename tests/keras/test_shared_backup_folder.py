"""BackupAndRestore shares its folder with a ModelCheckpoint file (and a user's files).

A common layout puts ``best.keras`` next to the backups. The backup side must treat
only its own backups (``backup-NNNNNNNNNN`` directories holding a training state) as
its own: restore from them, prune them and delete them, never anything else there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from seed_data import pima

import safepoint
from safepoint.keras import BackupAndRestore, ModelCheckpoint, series

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fit_script.py")


def build() -> keras.Model:
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(loss="mse", optimizer="adam")
    return model


class Stop(keras.callbacks.Callback):
    """Interrupt fit with an exception at the start of ``epoch``."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def fit(model, callbacks, epochs):
    x, y = pima()
    return model.fit(
        x[:200], y[:200], validation_split=0.25, epochs=epochs, batch_size=50,
        callbacks=callbacks, verbose=0,
    )  # fmt: skip


def backups(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("backup-"))


def test_fit_keeps_best_keras_and_the_users_files_and_deletes_only_its_backups(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    best = ModelCheckpoint(str(folder / "best.keras"), save_best_only=True)
    fit(build(), [BackupAndRestore(folder), best], epochs=4)
    assert sorted(os.listdir(folder)) == ["best.keras", "notes.txt", "safepoint-log.jsonl"]
    assert (folder / "notes.txt").read_text() == "mine"
    loaded = keras.models.load_model(folder / "best.keras")
    assert loaded.count_params() == build().count_params()


def test_an_interrupted_fit_resumes_from_its_backup_not_from_best_keras(tmp_path):
    folder = tmp_path / "run"
    best = str(folder / "best.keras")
    with pytest.raises(KeyboardInterrupt):
        fit(build(), [BackupAndRestore(folder), ModelCheckpoint(best), Stop(3)], epochs=5)
    # 3 batches an epoch; the two newest backups are kept, best.keras beside them.
    assert backups(folder) == ["backup-0000000006", "backup-0000000009"]
    history = fit(build(), [BackupAndRestore(folder), ModelCheckpoint(best)], epochs=5)
    assert len(history.history["loss"]) == 2  # epochs 4 and 5 only
    assert sorted(os.listdir(folder)) == ["best.keras", "safepoint-log.jsonl"]
    keras.models.load_model(folder / "best.keras")


def test_a_foreign_checkpoint_with_a_backup_name_is_neither_restored_nor_deleted(tmp_path):
    folder = tmp_path / "run"
    with safepoint.CheckpointManager(folder, name="backup-{step:010d}") as other:
        other.save({"x": np.arange(3)}, step=99)
    history = fit(build(), [BackupAndRestore(folder)], epochs=2)
    assert len(history.history["loss"]) == 2  # started fresh: backup-0000000099 is not ours
    assert backups(folder) == ["backup-0000000099"]
    ckpt = safepoint.CheckpointManager(folder).restore(checkpoint="backup-0000000099")
    assert ckpt is not None and ckpt.state["x"].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------- a real kill
def run(workdir, out: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    cmd = [sys.executable, SCRIPT, "--workdir", str(workdir), "--out", str(workdir / out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def load(path) -> dict[str, bytes]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k].tobytes() for k in npz.files}


@pytest.mark.e2e
def test_sigkill_then_rerun_resumes_beside_best_keras_and_keeps_it(tmp_path):
    args = ("--epochs", "4", "--best-beside")
    full = tmp_path / "full"
    full.mkdir()
    done = run(full, "final.npz", *args)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(full / "backup")) == ["best.keras", "safepoint-log.jsonl"]
    killed = run(tmp_path, "never.npz", *args, "--kill", "3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert backups(tmp_path / "backup") and (tmp_path / "backup" / "best.keras").exists()
    resumed = run(tmp_path, "final.npz", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert load(tmp_path / "final.npz") == load(full / "final.npz")
    assert sorted(os.listdir(tmp_path / "backup")) == ["best.keras", "safepoint-log.jsonl"]
    keras.models.load_model(tmp_path / "backup" / "best.keras")


def test_a_backup_deleted_while_resuming_is_not_called_corrupt(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(build(), [BackupAndRestore(folder), Stop(3)], epochs=5)
    newest = backups(folder)[-1]
    original = safepoint.CheckpointManager.restore

    def deleted_first(self, *args, **kwargs):
        if kwargs.get("checkpoint") == newest and (folder / newest).exists():
            shutil.rmtree(folder / newest)  # another process's cleanup got there first
        return original(self, *args, **kwargs)

    monkeypatch.setattr(safepoint.CheckpointManager, "restore", deleted_first)
    history = fit(build(), [BackupAndRestore(folder)], epochs=5)
    assert len(history.history["loss"]) == 3  # from the previous backup, after epoch 2
    assert "corrupt" not in capsys.readouterr().out


def test_backup_names_past_ten_digits_are_still_ours():
    assert series.PATTERN.fullmatch(series.NAME.format(step=10**10))
    assert not series.PATTERN.fullmatch("backup-1.keras")


def test_a_refused_backup_advises_moving_the_backups_not_deleting_the_folder(tmp_path):
    folder = tmp_path / "run"
    best = str(folder / "best.keras")
    fit(build(), [BackupAndRestore(folder, delete_checkpoint=False), ModelCheckpoint(best)], 1)
    keras.utils.set_random_seed(3)
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    other.compile(loss="mse", optimizer="adam")
    with pytest.raises(safepoint.StateMismatchError) as info:
        fit(other, [BackupAndRestore(folder)], epochs=2)
    text = str(info.value)
    assert f"The backup {folder / 'backup-0000000003'}'s model variables do not fit" in text
    assert "move the backup-* directories out of the backup folder" in text
    assert "delete" not in text.lower()
    keras.models.load_model(best)


def test_a_refused_backup_leaves_the_model_as_it_was(tmp_path):
    folder = tmp_path / "run"
    fit(build(), [BackupAndRestore(folder, delete_checkpoint=False)], epochs=1)
    model = build()
    model.compile(loss="mse", optimizer="sgd")  # the same layers, another optimizer
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(safepoint.StateMismatchError, match="optimizer state do not fit"):
        fit(model, [BackupAndRestore(folder)], epochs=2)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before, strict=True))
