"""Single-file checkpoints (``safepoint.catalog.singlefile``): commit faults, listing, tools."""

from __future__ import annotations

import json
import os

import keras
import pytest

import safepoint
from safepoint.keras import files
from safepoint_testing import Faults, faulty_manager


def build(seed: int = 7) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1, activation="sigmoid")]
    )


def save(mgr: safepoint.CheckpointManager, model: keras.Model, name: str, step: int):
    layout = files.WEIGHTS
    write = files.writer(model, layout)
    return mgr.save_file(name, write, step=step, epoch=step, metrics={}, layout=layout)


@pytest.mark.parametrize("existed", [True, False])
def test_a_failed_directory_fsync_keeps_the_old_file(tmp_path, existed):
    faults = Faults()
    mgr = faulty_manager(tmp_path, faults)
    path = tmp_path / "w.weights.h5"
    if existed:
        save(mgr, build(1), "w.weights.h5", 1)
        before = path.read_bytes()
    faults.arm("dir-fsync")
    with pytest.raises(safepoint.StorageError, match="intact") as info:
        save(mgr, build(2), "w.weights.h5", 2)
    assert info.value.stage == "dir-fsync"
    if existed:
        assert path.read_bytes() == before
        assert [c.step for c in mgr.checkpoints()] == [1]
    else:
        assert not path.exists() and mgr.checkpoints() == []
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    save(mgr, build(3), "w.weights.h5", 3)  # the next save works
    assert [c.step for c in mgr.checkpoints()] == [3]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_a_stray_file_with_an_unsafe_name_is_not_a_checkpoint(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path)
    save(mgr, build(1), "w.weights.h5", 1)
    (tmp_path / "C:\\x\\model.h5").write_bytes(b"someone else's file")
    (tmp_path / ".hidden.h5").write_bytes(b"another one")
    assert [c.name for c in mgr.checkpoints()] == ["w.weights.h5"]
    assert mgr.restore().name == "w.weights.h5"
    save(mgr, build(2), "v.weights.h5", 2)
    assert [c.name for c in mgr.checkpoints()] == ["w.weights.h5", "v.weights.h5"]


@pytest.mark.parametrize("how", ["save", "gc"])
def test_staging_files_of_a_killed_writer_are_cleaned_by_the_manager_and_gc(tmp_path, how):
    from safepoint.cli import main

    mgr = safepoint.CheckpointManager(tmp_path)
    save(mgr, build(1), "w.weights.h5", 1)
    mgr.close()
    stale = [tmp_path / ".sp.tmp-0123abcd.weights.h5", tmp_path / ".sp.tmp-89abcdef.keras"]
    for path in stale:
        path.write_bytes(b"half a file")
    mine = tmp_path / "notes.tmp-0123abcd.hdf5"
    mine.write_bytes(b"a user's file")
    if how == "gc":
        assert main(["gc", str(tmp_path)]) == 0
    else:
        safepoint.CheckpointManager(tmp_path).save({"x": 1}, step=2)
    assert not any(path.exists() for path in stale)
    assert mine.exists() and (tmp_path / "w.weights.h5").exists()


def test_safepoint_verify_checks_a_single_file_checkpoint(tmp_path, capsys):
    from safepoint.cli import main

    mgr = safepoint.CheckpointManager(tmp_path)
    save(mgr, build(1), "w.weights.h5", 1)
    mgr.close()
    path = tmp_path / "w.weights.h5"
    assert main(["verify", str(path)]) == 0
    assert "1 of 1 checkpoints verified." in capsys.readouterr().out
    assert main(["verify", str(path), "--deep", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"name": path.name, "ok": True, "error": None}]
    build(2).save_weights(tmp_path / "theirs.weights.h5")  # not written by safepoint
    code = main(["verify", str(tmp_path / "theirs.weights.h5")])
    assert code == safepoint.IncompatibleCheckpointError.exit_code  # not ours: not "incomplete"
    assert "no embedded safepoint manifest" in capsys.readouterr().out
    (tmp_path / "model.pt").write_bytes(b"\x80\x04 a pickle")
    assert main(["verify", str(tmp_path / "model.pt")]) != 0
    assert "never opens pickle" in capsys.readouterr().out
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["verify", str(path)]) == safepoint.CorruptCheckpointError.exit_code
    assert "FAILED  w.weights.h5" in capsys.readouterr().out


def test_huge_declared_dims_are_refused_before_allocation(tmp_path):
    import h5py
    import numpy as np

    def write(path):  # 3 * 2**62 bytes declared: the int64 product wraps negative
        with h5py.File(path, "w") as h5:
            h5.create_dataset("x", shape=(2**62, 3), dtype="u1", chunks=(1, 1))
            h5.create_dataset("y", data=np.arange(3, dtype="f4"))

    mgr = safepoint.CheckpointManager(tmp_path)
    layout = files.LEGACY_WEIGHTS
    mgr.save_file("w.h5", write, step=1, epoch=1, metrics={}, layout=layout)
    assert [v.ok for v in mgr.verify()] == [True]  # sealed with its true checksum
    with pytest.raises(safepoint.CorruptCheckpointError, match="more bytes than the file"):
        mgr.restore(checkpoint="w.h5")


def test_a_name_without_a_single_file_suffix_is_a_config_error(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path)
    with pytest.raises(safepoint.ConfigError, match=r"Expected a name ending in .*name='w.txt'"):
        save(mgr, build(1), "w.txt", 1)


def test_a_file_that_cannot_be_sealed_fails_the_save_with_a_storage_error(tmp_path, monkeypatch):
    from safepoint.ondisk import embedded

    mgr = safepoint.CheckpointManager(tmp_path)
    save(mgr, build(1), "w.weights.h5", 1)
    before = (tmp_path / "w.weights.h5").read_bytes()
    monkeypatch.setattr(embedded, "_proven", set())
    monkeypatch.setattr(embedded, "read_h5_manifest", lambda path, name: b"other bytes")
    with pytest.raises(safepoint.StorageError, match=r"verbatim.*Expected.*Received") as info:
        save(mgr, build(2), "w.weights.h5", 2)
    assert info.value.stage == "manifest"
    assert (tmp_path / "w.weights.h5").read_bytes() == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_a_flip_in_the_manifest_prefix_is_reported_not_hidden(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path)
    save(mgr, build(1), "w.weights.h5", 1)
    path = tmp_path / "w.weights.h5"
    original = path.read_bytes()
    start = original.index(b'{\n "format": "safepoint"')
    for pos in range(start, start + 24):
        damaged = bytearray(original)
        damaged[pos] ^= 0x10
        path.write_bytes(bytes(damaged))
        (result,) = safepoint.CheckpointManager(tmp_path).verify()
        assert isinstance(result.error, safepoint.CorruptCheckpointError), pos
