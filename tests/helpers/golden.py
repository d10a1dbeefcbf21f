"""The golden root of tests/data/golden_v1: what it holds, and how it was written.

``expected_*`` are pure functions: tests/test_golden_format.py recomputes them and
compares them with what today's reader gets out of the committed bytes. ``write(root)``
is the script that wrote those bytes once, with the code of the commit named in the
fixture's README (before the middle-layer redesign of issue 11). Do not rerun it to
"refresh" the fixture: the fixture's worth is that an older writer produced it.

Usage (only to make a new, separate fixture): ``python golden.py ROOT``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "torch")

DIR_CHECKPOINTS = {
    # name -> (format, step, metrics)
    "step-00000001": ("safetensors", 1, {"val_loss": 0.5, "acc": 0.25}),
    "step-00000002": ("hdf5", 2, {"val_loss": 0.25, "acc": 0.5}),
    "step-00000003": ("safetensors", 3, {"val_loss": 0.75, "acc": 0.75}),
}


def expected_arrays(step: int) -> dict[str, np.ndarray]:
    """Plain numpy leaves of every dtype the formats carry, bytes a function of ``step``."""
    rng = np.random.default_rng(1000 + step)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f64": rng.standard_normal(7),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i8": rng.integers(-128, 127, size=9, dtype=np.int8),
        "i64": rng.integers(-(2**62), 2**62, size=4, dtype=np.int64),
        "u8": rng.integers(0, 255, size=(2, 3, 2), dtype=np.uint8),
        "flags": rng.integers(0, 2, size=5).astype(bool),
        "scalar": np.array(rng.standard_normal(), dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def expected_values(step: int) -> dict[str, Any]:
    """JSON leaves: odd names and values from the wild."""
    return {
        "step": step,
        "huge": 2**70 + step,
        "nan": float("nan"),
        "inf": float("-inf"),
        "text": "naïve – 日本語 $HOME {step}",
        "none": None,
        "flag": True,
        "nested": {"list": [1, 2.5, "x", [None, False]], "$weird key": {"ü": step}},
    }


def torch_modules(step: int) -> tuple[Any, Any]:
    """A small torch model and an Adam optimizer that has taken ``step`` steps."""
    import torch

    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model[0].weight.data = model[0].weight.data.to(torch.bfloat16).to(torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(step):
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
    return model, opt


def bf16(step: int) -> Any:
    """A bfloat16 torch tensor (a dtype numpy lacks)."""
    import torch

    return torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16) + step


def state(step: int) -> dict[str, Any]:
    model, opt = torch_modules(step)
    return {
        "arrays": expected_arrays(step),
        "values": expected_values(step),
        "model": model,
        "optimizer": opt,
        "bf16": bf16(step),
    }


def keras_model() -> Any:
    import keras

    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def write(root: str) -> None:
    import keras

    import safepoint
    from safepoint.keras import ModelCheckpoint

    for name, (fmt, step, metrics) in DIR_CHECKPOINTS.items():
        mgr = safepoint.CheckpointManager(root, format=fmt, monitor="val_loss")
        saved = mgr.save(state(step), step=step, epoch=step, metrics=metrics)
        assert saved.name == name, saved.name
        mgr.close()

    model = keras_model()
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4)
    y = x.sum(axis=1, keepdims=True)
    cbs = [
        ModelCheckpoint(
            os.path.join(root, "keras", "w-{epoch:02d}.weights.h5"), save_weights_only=True
        ),
        ModelCheckpoint(os.path.join(root, "keras", "m-{epoch:02d}.keras")),
        ModelCheckpoint(os.path.join(root, "legacy", "best.hdf5"), save_weights_only=True),
    ]
    model.fit(x, y, epochs=2, batch_size=4, verbose=0, shuffle=False, callbacks=cbs)
    np.save(os.path.join(root, "keras", "expected_predictions.npy"), model.predict(x, verbose=0))
    keras.backend.clear_session()


if __name__ == "__main__":
    write(sys.argv[1])
