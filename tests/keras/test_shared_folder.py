"""Several Keras ModelCheckpoints in one folder (issue 10 items 2 and 8): they save side
by side, and one callback's ``keep=`` never prunes another callback's files."""

from __future__ import annotations

import os

import pytest

keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402
from seed_data import pima  # noqa: E402

import safepoint  # noqa: E402
from safepoint.keras import ModelCheckpoint  # noqa: E402


@pytest.fixture(scope="module")
def xy() -> tuple[np.ndarray, np.ndarray]:
    x, y = pima()
    return x[:240], y[:240]


def build(*, compile: bool = True) -> keras.Model:
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(1)]
    )
    if compile:
        model.compile(loss="mse", optimizer="adam")
    return model


def fit(model: keras.Model, xy, callbacks: list, epochs: int) -> None:
    x, y = xy
    model.fit(
        x, y, validation_split=0.25, epochs=epochs, batch_size=40, callbacks=callbacks, verbose=0
    )


def test_best_and_per_epoch_callbacks_in_one_folder_both_commit(xy, tmp_path) -> None:
    best = ModelCheckpoint(
        tmp_path / "weights.best.weights.h5", save_best_only=True, save_weights_only=True
    )
    last = ModelCheckpoint(tmp_path / "last-{epoch:02d}.weights.h5", save_weights_only=True)
    model = build()
    fit(model, xy, [best, last], epochs=3)
    names = sorted(n for n in os.listdir(tmp_path) if not n.startswith("safepoint-"))
    assert "weights.best.weights.h5" in names
    assert names[:3] == ["last-01.weights.h5", "last-02.weights.h5", "last-03.weights.h5"]
    listed = safepoint.CheckpointManager(tmp_path).checkpoints()
    seqs = [c.seq for c in listed]
    assert len(seqs) == len(set(seqs)) == 4
    assert all(v.ok for v in safepoint.CheckpointManager(tmp_path).verify())
    for name in ("weights.best.weights.h5", "last-03.weights.h5"):
        other = build(compile=False)
        other.load_weights(str(tmp_path / name))
    other.load_weights(str(tmp_path / "last-03.weights.h5"))
    assert all(
        np.array_equal(a, b) for a, b in zip(other.get_weights(), model.get_weights(), strict=True)
    )


def test_a_per_epoch_keep_never_prunes_an_earlier_fits_best_file(xy, tmp_path) -> None:
    model = build()
    fit(model, xy, [ModelCheckpoint(tmp_path / "weights.best.hdf5", save_best_only=True)], 2)
    assert os.path.exists(tmp_path / "weights.best.hdf5")
    per_epoch = ModelCheckpoint(tmp_path / "weights-{epoch:02d}.hdf5", keep=safepoint.Keep(last=2))
    fit(build(), xy, [per_epoch], epochs=4)
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".hdf5"))
    assert names == ["weights-03.hdf5", "weights-04.hdf5", "weights.best.hdf5"]
    build(compile=False).load_weights(str(tmp_path / "weights.best.hdf5"))
