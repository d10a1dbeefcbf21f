"""Manifests record their container (issue 11 item 4): ``directory``, ``hdf5`` or ``zip``
-- a ``.keras`` zip is no longer described only as an ``hdf5`` payload. Manifests
written before the field existed (tests/data/golden_v1) still say it, by inference."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint.cli.conversion import convert
from safepoint.ondisk.container import CONTAINER, container_of

h5py = pytest.importorskip("h5py")
GOLDEN = Path(__file__).parent / "data" / "golden_v1"


def _h5(path: str) -> None:
    with h5py.File(path, "w") as f:
        f["w"] = np.ones(3, np.float32)


def _keras_zip(path: str) -> None:
    weights = io.BytesIO()
    with h5py.File(weights, "w") as f:
        f["w"] = np.ones(3, np.float32)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", json.dumps({"class_name": "Sequential"}))
        z.writestr("model.weights.h5", weights.getvalue())


def test_each_kind_of_checkpoint_records_its_container(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"w": np.ones(3)}, step=1)
        mgr.save_file("w.h5", _h5, step=2)
        mgr.save_file("m.keras", _keras_zip, step=3)
        found = {c.name: mgr.catalog.manifest(c.name) for c in mgr.checkpoints()}
    recorded = {name: m.extra.get(CONTAINER) for name, m in found.items()}
    assert recorded == {"step-00000001": "directory", "w.h5": "hdf5", "m.keras": "zip"}
    assert {name: container_of(m) for name, m in found.items()} == recorded


def test_a_converted_file_is_recorded_as_a_directory(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save_file("m.keras", _keras_zip, step=1)
    convert(str(tmp_path / "m.keras"), str(tmp_path / "copy"), to="safetensors")
    copy = safepoint.CheckpointManager(tmp_path).catalog.manifest("copy")
    assert copy.extra[CONTAINER] == "directory" and container_of(copy) == "directory"


def test_old_manifests_without_the_field_say_their_container(tmp_path: Path) -> None:
    root = tmp_path / "golden"
    shutil.copytree(GOLDEN, root)
    kinds = {}
    for sub in (root, root / "keras", root / "legacy"):
        mgr = safepoint.CheckpointManager(sub)
        for ckpt in mgr.checkpoints():
            found = mgr.catalog.manifest(ckpt.name)
            assert CONTAINER not in found.extra  # written before the field existed
            kinds[ckpt.name] = container_of(found)
    assert kinds["step-00000001"] == "directory"
    assert kinds["m-01.keras"] == "zip"
    assert kinds["w-01.weights.h5"] == "hdf5" and kinds["best.hdf5"] == "hdf5"
