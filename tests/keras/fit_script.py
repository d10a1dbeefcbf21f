"""A seeded Keras ``fit`` run with safepoint's callbacks, killable with SIGKILL.

Run as a subprocess by the kill-and-resume tests (``python fit_script.py --help``):
it trains a small dropout network on Pima-shaped data with ``BackupAndRestore``,
safepoint's and Keras' ``ModelCheckpoint`` and ``EarlyStopping``, optionally kills
itself with SIGKILL at the start of an epoch or of a batch, and writes the final
weights and the last epoch's logs to an ``.npz`` file (no pickle).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seed_data import pima

from safepoint import preemption
from safepoint.keras import BackupAndRestore, ModelCheckpoint


class Killer(keras.callbacks.Callback):
    """SIGKILL this process at the start of epoch ``epoch`` (and batch ``batch``)."""

    def __init__(self, epoch: int, batch: int | None) -> None:
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch
        if self.batch is None and epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_begin(self, batch, logs=None):
        if self.current == self.epoch and batch == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class AwaitSignal(keras.callbacks.Callback):
    """At the start of ``batch`` of ``epoch``, say READY on stdout and wait for a signal.

    The test sends the signal from outside; it lands in the middle of this batch, and
    the backup callback saves at the batch's end.
    """

    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.current, batch) != (self.epoch, self.batch):
            return
        print("READY", flush=True)
        deadline = time.monotonic() + 120
        guard = preemption.active()
        while guard is not None and guard.pending is None and time.monotonic() < deadline:
            time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--save-freq", default="epoch")
    parser.add_argument("--kill", default="", help="EPOCH or EPOCH:BATCH (0-based)")
    parser.add_argument("--keras-backup", action="store_true", help="Keras' BackupAndRestore")
    parser.add_argument("--await-signal", default="", help="EPOCH:BATCH (0-based)")
    parser.add_argument(
        "--best-beside", action="store_true", help="also save best.keras in the backup folder"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    keras.utils.set_random_seed(7)
    x, y = pima()
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(12, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
    backup = keras.callbacks.BackupAndRestore if args.keras_backup else BackupAndRestore
    callbacks = [
        backup(os.path.join(args.workdir, "backup"), save_freq=freq),
        ModelCheckpoint(
            os.path.join(args.workdir, "best.weights.h5"),
            monitor="val_loss",
            save_best_only=True,
            save_weights_only=True,
        ),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=50),
    ]
    if args.best_beside:
        best = os.path.join(args.workdir, "backup", "best.keras")
        callbacks.append(ModelCheckpoint(best, monitor="val_loss", save_best_only=True))
    if args.await_signal:
        epoch, _, batch = args.await_signal.partition(":")
        callbacks.append(AwaitSignal(int(epoch), int(batch)))
    if args.kill:
        epoch, _, batch = args.kill.partition(":")
        callbacks.append(Killer(int(epoch), int(batch) if batch else None))
    history = model.fit(
        x,
        y,
        validation_split=0.33,
        epochs=args.epochs,
        batch_size=32,
        callbacks=callbacks,
        verbose=0,
    )
    last = {f"log_{k}": np.asarray(v[-1]) for k, v in history.history.items()}
    weights = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
    np.savez(args.out, **weights, **last)


if __name__ == "__main__":
    main()
