"""Preemption during Keras ``fit``: SIGTERM/SIGUSR1 become a backup, then an exit.

As ``save_on_signal`` does for PyTorch loops, ``BackupAndRestore`` notes the signal and
saves at the next batch end, then exits with ``128 + signal``; the same script run
again resumes from that backup and ends bit-identical to an uninterrupted ``fit``.
"""

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
from safepoint import preemption
from safepoint.keras import BackupAndRestore

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fit_script.py")


def build() -> keras.Model:
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(loss="mse", optimizer="adam")
    return model


class At(keras.callbacks.Callback):
    """Run ``action`` at the start of batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int, action) -> None:
        super().__init__()
        self.epoch, self.batch, self.action, self.current = epoch, batch, action, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            self.action()


def fit(model, callbacks, epochs=3):
    x, y = pima()
    return model.fit(
        x[:200], y[:200], validation_split=0.25, epochs=epochs, batch_size=50,
        callbacks=callbacks, verbose=0,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def no_guard_left():
    yield
    guard = preemption.active()
    if guard is not None:
        guard.remove()
        pytest.fail("a preemption guard outlived its test")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_mid_batch_saves_at_the_batch_end_and_exits(tmp_path, capfd, sig):
    folder = tmp_path / "backup"
    previous = signal.getsignal(sig)
    kill = At(1, 1, lambda: os.kill(os.getpid(), sig))
    with pytest.raises(SystemExit) as info:
        fit(build(), [BackupAndRestore(folder), kill])
    assert info.value.code == 128 + sig
    assert signal.getsignal(sig) is previous and preemption.active() is None
    ckpt = safepoint.CheckpointManager(folder).restore()
    assert ckpt is not None
    # 3 batches an epoch: the signal came during batch 1 of epoch 1 (0-based), so the
    # backup holds 2 batches of that epoch, after 3 + 2 steps.
    assert (ckpt.step, ckpt.state["progress"]["epoch"], ckpt.state["progress"]["batch"]) == (
        5,
        1,
        2,
    )
    err = capfd.readouterr().err
    assert f"received {sig.name}; saving a checkpoint at the next safe point" in err
    assert f"checkpoint {ckpt.name} committed" in err and f"status {128 + sig}" in err


def test_a_signal_at_the_end_of_an_epoch_reuses_the_epoch_backup(tmp_path):
    folder = tmp_path / "backup"

    class AtEpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit):
        fit(build(), [BackupAndRestore(folder), AtEpochEnd()])
    # The epoch's own backup is the one the signal needed: not saved twice.
    names = [c.name for c in safepoint.CheckpointManager(folder).checkpoints()]
    assert names == ["backup-0000000003", "backup-0000000006"]
    history = fit(build(), [BackupAndRestore(folder)])
    assert len(history.history["loss"]) == 1  # the third epoch only


def test_a_signal_after_the_last_epoch_is_saved_at_the_end_of_training(tmp_path):
    folder = tmp_path / "backup"

    class AtTrainEnd(keras.callbacks.Callback):  # runs before the backup's on_train_end
        def on_train_end(self, logs=None):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit):
        fit(build(), [BackupAndRestore(folder, save_freq=2), AtTrainEnd()], epochs=2)
    latest = safepoint.CheckpointManager(folder).restore()
    assert latest is not None and latest.state["progress"] == {
        **latest.state["progress"],
        "epoch": 2,
        "batch": 0,
    }
    history = fit(build(), [BackupAndRestore(folder)], epochs=2)
    assert history.history == {}  # nothing left to train
    assert not folder.exists()


def test_a_guard_left_by_a_failed_fit_hands_the_signal_back(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:

        def fail():
            raise RuntimeError("a bug in the user's callback")

        with pytest.raises(RuntimeError):
            fit(build(), [BackupAndRestore(tmp_path / "backup"), At(1, 0, fail)])
        assert preemption.active() is not None  # Keras called no on_train_end
        os.kill(os.getpid(), signal.SIGTERM)  # no fit running: not held for a safe point
        assert seen == [signal.SIGTERM]
        assert preemption.active() is None
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_signals_none_leaves_the_handlers_alone(tmp_path):
    seen = []
    check = At(0, 1, lambda: seen.append(signal.getsignal(signal.SIGTERM)))
    fit(build(), [BackupAndRestore(tmp_path / "a", signals=()), check], epochs=1)
    assert seen == [signal.SIG_DFL]
    fit(build(), [BackupAndRestore(tmp_path / "b"), check], epochs=1)
    assert seen[1] not in (signal.SIG_DFL, None)
    with pytest.raises(safepoint.ConfigError, match="SIGKILL cannot be caught"):
        BackupAndRestore(tmp_path / "c", signals=[signal.SIGKILL])


# ----------------------------------------------------------------------- a real signal
def run(workdir, out: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    cmd = [sys.executable, SCRIPT, "--workdir", str(workdir), "--out", str(workdir / out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def load(path) -> dict[str, bytes]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k].tobytes() for k in npz.files}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, bytes]:
    workdir = tmp_path_factory.mktemp("full")
    done = run(workdir, "final.npz", "--epochs", "3")
    assert done.returncode == 0, done.stderr
    return load(workdir / "final.npz")


@pytest.mark.e2e
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)]
)
def test_a_real_signal_then_a_rerun_ends_bit_identical(uninterrupted, tmp_path, sig):
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    cmd = [sys.executable, SCRIPT, "--workdir", str(tmp_path), "--out", str(tmp_path / "x.npz")]
    child = subprocess.Popen(
        [*cmd, "--epochs", "3", "--await-signal", "1:5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == "READY\n"
        child.send_signal(sig)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 128 + sig, err
    assert not (tmp_path / "x.npz").exists()
    latest = safepoint.CheckpointManager(tmp_path / "backup").latest()
    # 17 batches an epoch: the signal came during batch 5 of epoch 1 (0-based).
    assert latest is not None and latest.step == 17 + 6, err
    assert f"checkpoint {latest.name} committed" in err
    resumed = run(tmp_path, "final.npz", "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert load(tmp_path / "final.npz") == uninterrupted
