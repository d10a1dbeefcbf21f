"""Checkpoints written before the issue-11 redesign still load, bit for bit.

tests/data/golden_v1 was written once by tests/helpers/golden.py with the code of the
commit named in its README. Its bytes are never regenerated: whatever the middle layer
becomes, these files must list, verify and restore to exactly what was saved.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint

GOLDEN = Path(__file__).parent / "data" / "golden_v1"
_spec = importlib.util.spec_from_file_location(
    "golden", Path(__file__).parent / "helpers" / "golden.py"
)
assert _spec is not None and _spec.loader is not None
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy: opening a manager may clean up or append to the run log."""
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN, copy)
    return copy


def _same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict) and set(a) == set(b), (where, a, b)
        for key in b:
            _same(a[key], b[key], f"{where}/{key}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}/{i}")
    elif isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray), (where, type(a))
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, a.shape)
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(b, float) and math.isnan(b):
        assert isinstance(a, float) and math.isnan(a), (where, a)
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def test_listing_best_and_latest_are_as_written(root: Path) -> None:
    mgr = safepoint.CheckpointManager(root, monitor="val_loss")
    names = [c.name for c in mgr.checkpoints()]
    assert names == list(golden.DIR_CHECKPOINTS)
    for ckpt in mgr.checkpoints():
        _fmt, step, metrics = golden.DIR_CHECKPOINTS[ckpt.name]
        assert (ckpt.step, ckpt.epoch, ckpt.metrics) == (step, step, metrics)
    latest, best = mgr.latest(), mgr.best()
    assert latest is not None and latest.name == "step-00000003"
    assert best is not None and best.name == "step-00000002"
    mgr.verify()
    mgr.close()


@pytest.mark.parametrize("name", list(golden.DIR_CHECKPOINTS))
def test_restore_into_live_objects_is_bit_exact(root: Path, name: str) -> None:
    torch = pytest.importorskip("torch")
    step = golden.DIR_CHECKPOINTS[name][1]
    want_model, want_opt = golden.torch_modules(step)
    model, opt = golden.torch_modules(step + 50)  # other weights, other optimizer state
    target = {"model": model, "optimizer": opt}
    mgr = safepoint.CheckpointManager(root)
    ckpt = mgr.restore(target, checkpoint=name, strict=False)
    mgr.close()
    for got, want in zip(
        model.state_dict().values(), want_model.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want)
    got_opt, want_opt_sd = opt.state_dict(), want_opt.state_dict()
    assert got_opt["param_groups"] == want_opt_sd["param_groups"]
    for key, slot in want_opt_sd["state"].items():
        for field, value in slot.items():
            assert torch.equal(got_opt["state"][key][field], value), (key, field)
    assert ckpt.state is not None
    _same(ckpt.state["arrays"], golden.expected_arrays(step))
    _same(ckpt.state["values"], golden.expected_values(step))


@pytest.mark.parametrize("name", list(golden.DIR_CHECKPOINTS))
def test_plain_load_returns_the_saved_tree(root: Path, name: str) -> None:
    step = golden.DIR_CHECKPOINTS[name][1]
    tree = safepoint.load(root / name)
    _same(tree["arrays"], golden.expected_arrays(step))
    _same(tree["values"], golden.expected_values(step))
    torch = pytest.importorskip("torch")
    as_torch = safepoint.load(root / name, as_numpy=False)
    assert torch.equal(as_torch["bf16"], golden.bf16(step))
    lazy = safepoint.load(root / name, mmap=True)
    _same({k: np.array(v) for k, v in lazy["arrays"].items()}, golden.expected_arrays(step))


# Keras 3.15 on torch calls __array__ the numpy-1 way; not ours to fix.
@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
def test_keras_single_files_load_in_keras_and_in_safepoint(root: Path) -> None:
    keras = pytest.importorskip("keras")
    expected = np.load(root / "keras" / "expected_predictions.npy", allow_pickle=False)
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4)
    model = golden.keras_model()
    model.optimizer.build(model.trainable_variables)  # the file holds Adam's slots too
    model.load_weights(root / "keras" / "w-02.weights.h5")
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
    loaded = keras.models.load_model(root / "keras" / "m-02.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    legacy = golden.keras_model()
    legacy.optimizer.build(legacy.trainable_variables)
    legacy.load_weights(root / "legacy" / "best.hdf5")
    np.testing.assert_array_equal(legacy.predict(x, verbose=0), expected)

    mgr = safepoint.CheckpointManager(root / "keras")
    assert [c.name for c in mgr.checkpoints()] == [
        "w-01.weights.h5",
        "m-01.keras",
        "w-02.weights.h5",
        "m-02.keras",
    ]
    mgr.verify()
    mgr.close()
    for name in ("w-02.weights.h5", "m-02.keras"):
        assert safepoint.load(root / "keras" / name)


def test_cli_lists_and_verifies_the_old_root(root: Path) -> None:
    run = [sys.executable, "-m", "safepoint.cli"]
    out = subprocess.run([*run, "verify", str(root)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        [*run, "ls", "--json", str(root)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    rows = listed if isinstance(listed, list) else listed["checkpoints"]
    assert [row["name"] for row in rows] == list(golden.DIR_CHECKPOINTS)
