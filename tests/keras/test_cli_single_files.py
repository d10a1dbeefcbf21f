"""`safepoint diff/show/convert` see the weights of Keras single-file checkpoints
(issue 10 item 10): two files with different weights are never "identical", `show`
lists their tensors and names the container (a `.keras` zip is not "hdf5")."""

from __future__ import annotations

import json
import sys

import keras
import numpy as np
import pytest

import safepoint
from safepoint.cli import main
from safepoint.cli.report import flatten_arrays
from safepoint.keras import files

LAYOUTS = {
    "w.weights.h5": files.WEIGHTS,
    "m.keras": files.KERAS,
    "legacy.h5": files.LEGACY_MODEL,
}


def build(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(4, name="hidden"), keras.layers.Dense(1, name="out")]
    return keras.Sequential([keras.Input((8,)), *layers], name="net")  # names fixed: the
    # legacy .h5 layout keys weights by layer name, which Keras numbers per session


def write(folder, name: str, seed: int):
    """One committed single file; step, epoch and metrics equal for every seed."""
    mgr = safepoint.CheckpointManager(folder)
    layout = LAYOUTS[name]
    mgr.save_file(
        name, files.writer(build(seed), layout), step=1, epoch=1, metrics={"loss": 0.5},
        layout=layout,
    )  # fmt: skip
    mgr.close()
    return folder / name


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_diff_sees_different_weights(tmp_path, capsys, name):
    a, b = write(tmp_path / "a", name, 1), write(tmp_path / "b", name, 2)
    assert main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "identical" not in out
    assert "~ tensor " in out and "values differ" in out
    assert main(["diff", "--json", str(a), str(b)]) == 1
    body = json.loads(capsys.readouterr().out)
    assert body["identical"] is False
    assert {c["change"] for c in body["changes"]} == {"values"}
    # two Dense layers: the kernels differ; the biases start at zero in both
    assert len(body["changes"]) == 2
    assert all(c["changed"] == c["size"] and c["max_abs_diff"] > 0 for c in body["changes"])
    same = write(tmp_path / "c", name, 1)
    assert main(["diff", str(a), str(same)]) == 0
    assert "identical" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "container"), [("m.keras", "Keras .keras zip"),
                                                 ("w.weights.h5", "HDF5 file"),
                                                 ("legacy.h5", "HDF5 file")])  # fmt: skip
def test_show_lists_the_weights_and_names_the_container(tmp_path, capsys, name, container):
    path = write(tmp_path, name, 1)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert container in out and "format hdf5" not in out
    assert "4 tensors:" in out and "float32" in out and "[8, 4]" in out
    assert main(["show", "--json", str(path)]) == 0
    body = json.loads(capsys.readouterr().out)
    assert sorted(v["shape"] for v in body["weights"].values()) == [[1], [4], [4, 1], [8, 4]]


def test_a_changed_layout_is_a_difference(tmp_path, capsys):
    a, b = write(tmp_path / "a", "w.weights.h5", 1), write(tmp_path / "b", "m.keras", 1)
    assert main(["diff", str(a), str(b)]) == 1
    assert "~ layout differs" in capsys.readouterr().out


def test_convert_writes_a_keras_files_weights_as_a_checkpoint_directory(tmp_path, capsys):
    src = write(tmp_path / "run", "m.keras", 3)
    out = tmp_path / "converted"
    assert main(["convert", str(src), "--to", "safetensors", "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    original, converted = flatten_arrays(safepoint.load(src)), safepoint.load(out)
    assert original and flatten_arrays(converted).keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(flatten_arrays(converted)[key], value)
    capsys.readouterr()
    assert main(["diff", str(src), str(out)]) == 1  # same weights, another layout
    assert capsys.readouterr().out == "~ layout differs (zip/keras-v3 -> directory)\n"


def test_without_h5py_reading_weights_is_a_clear_error(tmp_path, capsys, monkeypatch):
    path = write(tmp_path / "run", "w.weights.h5", 1)
    monkeypatch.setitem(sys.modules, "h5py", None)
    convert = ["convert", str(path), "--to", "safetensors", "--out", str(tmp_path / "o")]
    for argv in (["show", str(path)], ["diff", str(path), str(path)], convert):
        assert main(argv) == safepoint.IncompatibleCheckpointError.exit_code
        assert "needs h5py" in capsys.readouterr().err
    assert main(["verify", str(path)]) == 0  # checksums need no h5py
