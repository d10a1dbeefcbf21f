"""The PyTorch loop and Keras' BackupAndRestore resume exactly from a bucket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest

import safepoint

pytest.importorskip("safepoint.storage.s3")
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "torch_loop.py")
SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))


def _loop(root: str, env: dict[str, str], *, kill_after: str | None = None) -> str:
    """Run examples/torch_loop.py on ``root``; SIGKILL it once it prints ``kill_after``."""
    proc = subprocess.Popen(
        [sys.executable, EXAMPLE, root], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        out.append(line)
        if kill_after is not None and line.startswith(kill_after):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    code = proc.wait(timeout=300)
    assert code == (-signal.SIGKILL if kill_after else 0), "".join(out)
    return "".join(out)


@pytest.mark.e2e
def test_a_torch_loop_killed_mid_run_resumes_bit_exactly_from_a_bucket(s3_env, s3_root):
    pytest.importorskip("torch")
    env = {**os.environ, "PYTHONPATH": SRC}
    full = _loop(f"{s3_root}-full", env)
    killed = _loop(s3_root, env, kill_after="epoch 2")
    assert "weights:" not in killed
    assert safepoint.CheckpointManager(s3_root).checkpoints(), "no checkpoint before the kill"
    resumed = _loop(s3_root, env)
    assert "resumed from step-" in resumed
    weights = [line for line in full.splitlines() if line.startswith("weights:")]
    assert weights and weights[0] in resumed.splitlines()


@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
def test_keras_backup_and_restore_resumes_exactly_from_a_bucket(s3_env, s3_root):
    keras = pytest.importorskip("keras")
    from safepoint.keras import BackupAndRestore

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 8)).astype("float32"), rng.normal(size=(200, 1))

    def build():
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
        )
        model.compile(loss="mse", optimizer="adam")
        return model

    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:
                raise KeyboardInterrupt

    def fit(model, callbacks):
        model.fit(x, y, epochs=5, batch_size=50, shuffle=True, callbacks=callbacks, verbose=0)
        return [w.tobytes() for w in model.get_weights()]

    expected = fit(build(), [])
    backup = f"{s3_root}/backup"
    with pytest.raises(KeyboardInterrupt):
        fit(build(), [BackupAndRestore(backup), Stop()])
    assert [c.epoch for c in safepoint.CheckpointManager(backup).checkpoints()][-1] == 3
    assert fit(build(), [BackupAndRestore(backup)]) == expected
    assert safepoint.CheckpointManager(backup).checkpoints() == []  # deleted at the end
