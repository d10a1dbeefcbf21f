"""safepoint.keras.BackupAndRestore: a fit killed with SIGKILL resumes bit-exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from seed_data import pima

import safepoint
from safepoint.keras import BackupAndRestore, ModelCheckpoint

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fit_script.py")


def run(workdir, out: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    cmd = [sys.executable, SCRIPT, "--workdir", str(workdir), "--out", str(workdir / out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def load(path) -> dict[str, bytes]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k].tobytes() for k in npz.files}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Final weights and logs of uninterrupted runs, per save_freq."""
    out = {}
    for freq in ("epoch", "4"):
        workdir = tmp_path_factory.mktemp(f"full-{freq}")
        done = run(workdir, "final.npz", "--epochs", "5", "--save-freq", freq)
        assert done.returncode == 0, done.stderr
        assert not os.path.exists(workdir / "backup")  # delete_checkpoint=True
        out[freq] = load(workdir / "final.npz")
    return out


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("freq", "kill"),
    [("epoch", "3"), ("4", "2:9")],
    ids=["epoch-boundary", "mid-epoch"],
)
def test_sigkill_then_restart_ends_bit_identical(uninterrupted, tmp_path, freq, kill):
    killed = run(tmp_path, "never.npz", "--epochs", "5", "--save-freq", freq, "--kill", kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not os.path.exists(tmp_path / "never.npz")
    backups = safepoint.CheckpointManager(tmp_path / "backup").checkpoints()
    assert backups, "the killed run left no backup"
    # Epoch 3 begins after 3 epochs of 17 batches; with save_freq=4 the newest backup
    # is mid-epoch 2 (batch 40 = 34 + 6), so the restart skips 6 batches of that epoch.
    assert backups[-1].step == (51 if freq == "epoch" else 40)
    resumed = run(tmp_path, "final.npz", "--epochs", "5", "--save-freq", freq)
    assert resumed.returncode == 0, resumed.stderr
    assert load(tmp_path / "final.npz") == uninterrupted[freq]


@pytest.mark.e2e
def test_keras_own_backup_does_not_resume_exactly(uninterrupted, tmp_path):
    """The control: without the RNG state the same kill ends with other weights."""
    args = ("--epochs", "5", "--keras-backup")
    assert run(tmp_path, "never.npz", *args, "--kill", "3").returncode == -signal.SIGKILL
    assert run(tmp_path, "final.npz", *args).returncode == 0
    final = load(tmp_path / "final.npz")
    assert final.keys() == uninterrupted["epoch"].keys()
    assert final != uninterrupted["epoch"]


# ----------------------------------------------------------------------- in process
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


def test_callback_states_come_back(tmp_path):
    backup = tmp_path / "backup"
    es = keras.callbacks.EarlyStopping(monitor="val_loss", patience=100)
    mc = ModelCheckpoint(tmp_path / "b.keras", save_best_only=True)
    with pytest.raises(KeyboardInterrupt):
        fit(build(), [BackupAndRestore(backup), es, mc, Stop(4)], epochs=6)
    assert (es.best, mc.best) != (None, None)
    seen = {}

    def record(epoch, logs):
        seen.setdefault("first", (epoch, es2.wait, es2.best, mc2.best))

    es2 = keras.callbacks.EarlyStopping(monitor="val_loss", patience=100)
    mc2 = ModelCheckpoint(tmp_path / "b.keras", save_best_only=True)
    peek = keras.callbacks.LambdaCallback(on_epoch_begin=record)
    history = fit(build(), [BackupAndRestore(backup), es2, mc2, peek], epochs=6)
    assert seen["first"] == (4, es.wait, es.best, mc.best)
    assert len(history.history["loss"]) == 2
    assert not backup.exists()


def test_a_corrupt_backup_resumes_from_the_previous_one_saying_which(tmp_path, capsys):
    backup = tmp_path / "backup"
    with pytest.raises(KeyboardInterrupt):
        fit(build(), [BackupAndRestore(backup), Stop(3)], epochs=5)
    names = [c.name for c in safepoint.CheckpointManager(backup).checkpoints()]
    assert len(names) == 2
    payload = backup / names[-1] / "model-00000.safetensors"
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0x40
    payload.write_bytes(bytes(data))
    history = fit(build(), [BackupAndRestore(backup)], epochs=5)
    out = capsys.readouterr().out
    assert f"backup {backup / names[-1]} is corrupt or unreadable" in out
    assert f"resuming from the previous one, {backup / names[0]} (epoch 2, batch 0)" in out
    assert len(history.history["loss"]) == 3


def test_delete_checkpoint_false_keeps_the_backups(tmp_path):
    backup = tmp_path / "backup"
    fit(build(), [BackupAndRestore(backup, delete_checkpoint=False)], epochs=2)
    assert [c.epoch for c in safepoint.CheckpointManager(backup).checkpoints()] == [1, 2]


def test_backup_dir_that_is_a_file_is_a_config_error(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(safepoint.ConfigError, match=r"Received: backup_dir=.*a-file\. Choose"):
        BackupAndRestore(path)
    with pytest.raises(safepoint.ConfigError, match=r"Received: save_freq='often'"):
        BackupAndRestore(tmp_path / "d", save_freq="often")


def test_a_backup_of_another_model_is_refused(tmp_path):
    backup = tmp_path / "backup"
    fit(build(), [BackupAndRestore(backup, delete_checkpoint=False)], epochs=1)
    keras.utils.set_random_seed(3)
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    other.compile(loss="mse", optimizer="adam")
    with pytest.raises(safepoint.StateMismatchError, match="do not fit this model"):
        fit(other, [BackupAndRestore(backup)], epochs=2)
