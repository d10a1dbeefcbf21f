"""The Keras callbacks' messages say only what is true when they are printed."""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import pytest

import safepoint
from safepoint.keras import ModelCheckpoint
from safepoint.storage import commit as transaction


def build() -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    return model


def fit(model, callback, epochs=2):
    x = np.random.default_rng(0).normal(size=(40, 4))
    model.fit(x, x[:, :1], epochs=epochs, batch_size=20, callbacks=[callback], verbose=0)


def test_finished_saving_is_printed_once_the_file_is_committed(tmp_path, monkeypatch):
    real_fsync = transaction.fsync_path
    said: list[tuple[str, bool]] = []

    def slow_fsync(path: str) -> None:
        time.sleep(0.2)  # the commit lags behind the training thread
        real_fsync(path)

    def record(message: str, line_break: bool = True) -> None:
        for n in (1, 2):
            if f"Epoch {n}: finished saving" in message:
                said.append((message.strip(), (tmp_path / f"w-{n}.weights.h5").exists()))

    monkeypatch.setattr(transaction, "fsync_path", slow_fsync)
    monkeypatch.setattr("safepoint.keras.model_checkpoint.io_utils.print_msg", record)
    cb = ModelCheckpoint(tmp_path / "w-{epoch}.weights.h5", save_weights_only=True, verbose=1,
                         monitor="loss")  # fmt: skip
    fit(build(), cb)
    assert said == [
        (f"Epoch 1: finished saving model to {tmp_path / 'w-1.weights.h5'}", True),
        (f"Epoch 2: finished saving model to {tmp_path / 'w-2.weights.h5'}", True),
    ]


def test_a_failed_commit_never_says_finished_saving(tmp_path, monkeypatch, capsys):
    def failing_fsync(path: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(transaction, "fsync_path", failing_fsync)
    cb = ModelCheckpoint(tmp_path / "w.weights.h5", save_weights_only=True, verbose=1,
                         monitor="loss")  # fmt: skip
    with pytest.raises(safepoint.StorageError, match="Input/output error"):
        fit(build(), cb)
    out = capsys.readouterr().out
    assert "Epoch 1: saving model to" in out
    assert "finished saving" not in out
    assert not os.path.exists(tmp_path / "w.weights.h5")
