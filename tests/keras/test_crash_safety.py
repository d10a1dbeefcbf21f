"""A kill at any stage of a ModelCheckpoint save leaves the old file or the new one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from seed_data import pima

import safepoint
from safepoint.keras import ModelCheckpoint
from safepoint.storage import commit as transaction

# Saves weights.best.hdf5 every epoch and SIGKILLs itself when the third save reaches
# STAGE (a stage of safepoint.catalog.singlefile's commit, through the storage fault seam).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras, numpy as np
    from safepoint.storage.local import LocalStorage
    from safepoint.keras import ModelCheckpoint

    stage, workdir = sys.argv[1], sys.argv[2]
    seen = []

    def fault(self, at, target):
        if at == stage:
            seen.append(at)
            if len(seen) == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    LocalStorage._fault = fault
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    x = np.random.default_rng(0).normal(size=(64, 8))
    weights = []
    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            np.save(os.path.join(workdir, f"epoch-{epoch + 1}.npy"), model.get_weights()[0])
    model.fit(x, x[:, :1], epochs=5, batch_size=16, verbose=0, callbacks=[
        Record(), ModelCheckpoint(os.path.join(workdir, "weights.best.hdf5"), monitor="loss")])
    """
)


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["write", "manifest", "fsync", "rename", "dir-fsync"])
def test_sigkill_at_each_stage_of_a_save_leaves_a_whole_file(tmp_path, stage):
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, stage, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    mgr = safepoint.CheckpointManager(tmp_path)
    (ckpt,) = mgr.checkpoints()
    assert [v.ok for v in mgr.verify()] == [True]
    # Before the rename the second save is what is there; after it, the third.
    expected = 3 if stage == "dir-fsync" else 2
    assert ckpt.epoch == expected
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    model.load_weights(tmp_path / "weights.best.hdf5")
    assert np.array_equal(model.get_weights()[0], np.load(tmp_path / f"epoch-{expected}.npy"))
    # The next run cleans up what the killed one left staged.
    x, y = pima()
    again = ModelCheckpoint(tmp_path / "weights.best.hdf5", monitor="loss")
    model.fit(x[:40], y[:40], epochs=1, verbose=0, callbacks=[again])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_a_failed_background_commit_is_raised_by_fit(tmp_path, monkeypatch):
    def failing_fsync(path: str) -> None:
        raise OSError(5, "Input/output error")

    x, y = pima()
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    path = tmp_path / "w.weights.h5"
    first = ModelCheckpoint(path, monitor="loss", save_weights_only=True)
    model.fit(x[:40], y[:40], epochs=1, verbose=0, callbacks=[first])
    before = path.read_bytes()
    monkeypatch.setattr(transaction, "fsync_path", failing_fsync)
    cb = ModelCheckpoint(path, monitor="loss", save_weights_only=True)
    with pytest.raises(safepoint.StorageError, match=r"stage 'fsync'.*Input/output error"):
        model.fit(x[:40], y[:40], epochs=2, verbose=0, callbacks=[cb])
    assert path.read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
