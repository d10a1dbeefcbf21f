"""Metric names: Keras 2's ``acc`` aliases apply only where the logs lack the name.

Keras 3 logs a metric under the name it was given: ``keras.metrics.Accuracy("acc")``
is logged as ``acc``/``val_acc``, and ``"accuracy"`` as ``accuracy``/``val_accuracy``.
A checkpoint's manifest records each metric once, under the name Keras logged.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import safepoint
from safepoint.keras import BackupAndRestore, ModelCheckpoint


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    x = rng.normal(size=(60, 3))
    return x, keras.utils.to_categorical(rng.integers(0, 3, size=60), num_classes=3)


def build(metric) -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)]
    )
    model.compile(loss="categorical_crossentropy", optimizer="sgd", metrics=[metric])
    return model


def fit(model, callbacks, epochs=2):
    x, y = data()
    return model.fit(
        x[:30], y[:30], validation_data=(x[30:], y[30:]), batch_size=5, epochs=epochs,
        callbacks=callbacks, verbose=0,
    )  # fmt: skip


@pytest.mark.parametrize("threshold", [None, -0.01])
def test_a_metric_named_acc_is_monitored_as_logged(tmp_path, capsys, threshold):
    path = tmp_path / "checkpoint.keras"
    cb = ModelCheckpoint(
        path, monitor="val_acc", mode="max", save_best_only=True, verbose=1,
        initial_value_threshold=threshold,
    )  # fmt: skip
    # No Keras 2 notice either ('val_acc' is logged as it is): warnings are errors here.
    history = fit(build(keras.metrics.Accuracy("acc")), [cb], epochs=1)
    assert "val_acc" in history.history and "val_accuracy" not in history.history
    out = capsys.readouterr().out
    first = "None" if threshold is None else "-0.01000"
    assert f"Epoch 1: val_acc improved from {first} to" in out, out
    assert "did not improve" not in out
    assert path.exists()
    (ckpt,) = safepoint.CheckpointManager(tmp_path).checkpoints()
    assert ckpt.metrics["val_acc"] == history.history["val_acc"][0]


def test_filename_fields_and_keep_best_read_a_metric_named_acc(tmp_path):
    cb = ModelCheckpoint(
        tmp_path / "w-{epoch:02d}-{val_acc:.4f}.weights.h5", monitor="val_acc",
        save_weights_only=True, keep=safepoint.Keep(best=1),
    )  # fmt: skip
    history = fit(build(keras.metrics.CategoricalAccuracy("acc")), [cb], epochs=3)
    values = history.history["val_acc"]
    best = max(range(3), key=lambda i: (values[i], -i))
    kept = {f"w-{i + 1:02d}-{values[i]:.4f}.weights.h5" for i in (best, 2)}  # best, newest
    assert set(os.listdir(tmp_path)) == {"safepoint-log.jsonl", *kept}


def test_keras3_accuracy_is_recorded_once_and_keep_best_still_finds_val_acc(tmp_path):
    with pytest.warns(UserWarning, match="'val_acc' -> 'val_accuracy' are Keras 2 metric names"):
        cb = ModelCheckpoint(
            tmp_path / "w-{epoch:02d}-{val_acc:.4f}.weights.h5", monitor="val_acc",
            save_weights_only=True, keep=safepoint.Keep(best=1),
        )  # fmt: skip
        history = fit(build("accuracy"), [cb], epochs=3)
    values = history.history["val_accuracy"]
    best = max(range(3), key=lambda i: (values[i], -i))
    listed = safepoint.CheckpointManager(tmp_path).checkpoints()
    kept = {f"w-{i + 1:02d}-{values[i]:.4f}.weights.h5" for i in (best, 2)}  # best, newest
    assert {c.name for c in listed} == kept
    for ckpt in listed:
        assert sorted(ckpt.metrics) == ["accuracy", "loss", "val_accuracy", "val_loss"]


def test_the_keras2_notice_is_given_once_per_callback(tmp_path):
    cb = ModelCheckpoint(tmp_path / "w.weights.h5", monitor="val_acc", save_weights_only=True)
    with pytest.warns(UserWarning, match="Keras 2 metric names") as notices:
        fit(build("accuracy"), [cb], epochs=1)
        fit(build("accuracy"), [cb], epochs=1)
    assert len([n for n in notices if "Keras 2 metric names" in str(n.message)]) == 1


def test_backups_record_each_metric_once(tmp_path):
    fit(build("accuracy"), [BackupAndRestore(tmp_path, delete_checkpoint=False)], epochs=1)
    (ckpt,) = safepoint.CheckpointManager(tmp_path).checkpoints()
    assert sorted(ckpt.metrics) == ["accuracy", "loss", "val_accuracy", "val_loss"]
