"""Single-file checkpoints (Keras ``.h5``/``.keras``/``.weights.h5``) in a bucket."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest

import safepoint
from safepoint.cli import main
from safepoint.errors import CorruptCheckpointError, StorageError

s3 = pytest.importorskip("safepoint.storage.s3")
sys.path.insert(0, os.path.dirname(__file__))
from racing import race  # noqa: E402

h5py = pytest.importorskip("h5py")

_KERAS_COPY = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"


def _writer(value: float):
    def write(path: str) -> None:
        with h5py.File(path, "w") as f:
            f["layer/kernel"] = np.full((32, 4), value, dtype=np.float32)

    return write


def _two_files(s3_root: str):
    """Commit a.h5 (step 1) and b.h5 (step 2); the root's storage, to damage them."""
    mgr = safepoint.CheckpointManager(s3_root)
    mgr.save_file("a.h5", _writer(1.0), step=1)
    mgr.save_file("b.h5", _writer(2.0), step=2)
    mgr.close()
    return s3.open_root(s3_root)


def test_save_file_commits_lists_loads_replaces_and_prunes_files_in_a_bucket(s3_env, s3_root):
    mgr = safepoint.CheckpointManager(s3_root, keep=safepoint.Keep(last=2))
    for step in (1, 2, 3):
        mgr.save_file(f"w-{step}.h5", _writer(step), step=step, metrics={"loss": 1.0 / step})
    mgr.save_file("w-3.h5", _writer(30.0), step=3)  # a re-save replaces the file
    mgr.close()
    listed = safepoint.CheckpointManager(s3_root).checkpoints()
    assert [c.name for c in listed] == ["w-2.h5", "w-3.h5"]  # w-1.h5 pruned
    state = safepoint.load(f"{s3_root}/w-3.h5")
    assert np.array_equal(state["layer"]["kernel"], np.full((32, 4), 30.0, np.float32))
    assert [v.ok for v in safepoint.CheckpointManager(s3_root).verify()] == [True, True]
    storage = s3.open_root(s3_root)
    assert sorted(storage.list_names()) == ["w-2.h5", "w-3.h5"]


def test_convert_copies_a_file_in_a_bucket_to_a_local_directory(s3_env, s3_root, tmp_path):
    mgr = safepoint.CheckpointManager(s3_root)
    mgr.save_file("w.h5", _writer(7.0), step=4)
    mgr.close()
    out = tmp_path / "w-local"
    assert main(["convert", f"{s3_root}/w.h5", "--to", "safetensors", "--out", str(out)]) == 0
    assert np.array_equal(safepoint.load(out)["layer"]["kernel"], np.full((32, 4), 7.0, np.float32))


def test_a_damaged_file_in_a_bucket_is_named_by_verify_and_load(s3_env, s3_root, capsys):
    storage = _two_files(s3_root)
    key = storage._key("b.h5/b.h5")
    data, _, _ = storage.client.get(key)
    broken = bytearray(data)
    broken[len(broken) // 2] ^= 0x01
    storage.client.put(key, bytes(broken), stage="test")
    with pytest.raises(CorruptCheckpointError):
        safepoint.load(f"{s3_root}/b.h5")
    assert main(["verify", s3_root]) == 5
    out = capsys.readouterr().out
    assert "FAILED  b.h5" in out and "ok      a.h5" in out
    back = safepoint.CheckpointManager(s3_root).restore()
    assert back is not None and back.name == "a.h5"  # falls back past the damaged file


def test_a_payload_swapped_for_another_saves_file_is_refused(s3_env, s3_root):
    storage = _two_files(s3_root)
    data, _, _ = storage.client.get(storage._key("a.h5/a.h5"))
    storage.client.put(storage._key("b.h5/b.h5"), data, stage="test")  # sound file, wrong save
    with pytest.raises(CorruptCheckpointError, match="differs from the record"):
        safepoint.load(f"{s3_root}/b.h5")


def test_a_failed_upload_lists_nothing_and_leaves_the_old_file(s3_env, s3_root):
    mgr = safepoint.CheckpointManager(s3_root)
    mgr.save_file("w.h5", _writer(1.0), step=1)

    def boom(path: str) -> None:
        _writer(2.0)(path)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        mgr.save_file("w.h5", boom, step=2)
    mgr.close()
    assert safepoint.load(f"{s3_root}/w.h5")["layer"]["kernel"][0, 0] == 1.0
    assert [c.step for c in safepoint.CheckpointManager(s3_root).checkpoints()] == [1]


@pytest.mark.filterwarnings(_KERAS_COPY)
def test_keras_model_checkpoint_keeps_the_best_model_in_a_bucket(s3_env, s3_root, capsys):
    keras = pytest.importorskip("keras")
    from safepoint.keras import ModelCheckpoint

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 8)).astype("float32"), rng.normal(size=(120, 1))
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="adam")
    best = ModelCheckpoint(
        f"{s3_root}/best.weights.h5", monitor="loss", save_best_only=True, save_weights_only=True
    )
    every = ModelCheckpoint(f"{s3_root}/model-{{epoch:02d}}.keras")
    history = model.fit(x, y, epochs=4, batch_size=40, callbacks=[best, every], verbose=0)
    losses = history.history["loss"]
    names = [c.name for c in safepoint.CheckpointManager(s3_root).checkpoints()]
    assert set(names) == {
        "best.weights.h5",
        "model-01.keras",
        "model-02.keras",
        "model-03.keras",
        "model-04.keras",
    }
    ckpt = {c.name: c for c in safepoint.CheckpointManager(s3_root).checkpoints()}
    assert ckpt["best.weights.h5"].metrics["loss"] == pytest.approx(min(losses))
    # The last model file holds the weights the model ends with (and its optimizer's).
    final = safepoint.load(f"{s3_root}/model-04.keras")
    stored = {np.asarray(a).tobytes() for a in _leaves(final)}
    assert all(w.tobytes() in stored for w in model.get_weights())
    assert main(["verify", s3_root, "--deep"]) == 0
    assert "5 of 5 checkpoints verified." in capsys.readouterr().out
    assert main(["show", f"{s3_root}/best.weights.h5"]) == 0
    assert "best.weights.h5" in capsys.readouterr().out


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def test_a_file_whose_payload_object_is_gone_is_damage_not_absence(s3_env, s3_root, capsys):
    storage = _two_files(s3_root)
    storage.client.delete([storage._key("b.h5/b.h5")], stage="test")
    with pytest.raises(CorruptCheckpointError, match="committed but its file is missing"):
        safepoint.load(f"{s3_root}/b.h5")
    assert main(["verify", s3_root]) == 5
    assert "FAILED  b.h5" in capsys.readouterr().out
    back = safepoint.CheckpointManager(s3_root).restore()
    assert back is not None and back.name == "a.h5"


def test_a_link_left_by_write_fn_is_refused_on_a_bucket(s3_env, s3_root, tmp_path):
    outside = tmp_path / "outside.h5"
    _writer(5.0)(str(outside))
    before = outside.read_bytes()
    mgr = safepoint.CheckpointManager(s3_root)
    with pytest.raises(StorageError, match="a symbolic link"):
        mgr.save_file("w.h5", lambda path: os.symlink(outside, path), step=1)
    mgr.close()
    assert (
        outside.read_bytes() == before and safepoint.CheckpointManager(s3_root).checkpoints() == []
    )


def test_a_reader_racing_resaves_of_a_file_never_sees_damage(s3_env, s3_root):
    mgr = safepoint.CheckpointManager(s3_root)
    mgr.save_file("best.h5", _writer(0.0), step=0)
    try:
        loads = race(
            lambda: safepoint.load(f"{s3_root}/best.h5")["layer"]["kernel"],
            lambda value: bool((value == value.flat[0]).all()),  # one version, whole
            lambda step: mgr.save_file("best.h5", _writer(float(step)), step=step),
            saves=15,
        )
    finally:
        mgr.close()
    assert loads > 0


def _temp_dirs() -> set[str]:
    import tempfile

    base = tempfile.gettempdir()
    return {n for n in os.listdir(base) if n.startswith("safepoint-file-")}


def test_temporary_files_never_outlive_their_save(s3_env, s3_root):
    import gc
    import subprocess
    import sys
    import tempfile

    before = _temp_dirs()
    mgr = safepoint.CheckpointManager(s3_root)
    staged = mgr.stage_file("w.h5", _writer(1.0), step=1)
    assert len(_temp_dirs() - before) == 1
    del staged  # dropped between the two halves of save_file
    gc.collect()
    assert _temp_dirs() - before == set()
    # A process killed with one: the next save removes it.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    left = os.path.join(tempfile.gettempdir(), f"safepoint-file-{dead.stdout.strip()}-x")
    os.makedirs(os.path.join(left, "inner"))
    mgr.save_file("w.h5", _writer(2.0), step=2)
    mgr.close()
    assert not os.path.exists(left)
    assert _temp_dirs() - before == set()


def test_ls_shows_the_size_of_a_file_in_a_bucket(s3_env, s3_root, capsys):
    import json

    storage = _two_files(s3_root)
    assert main(["ls", s3_root, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    rows = rows if isinstance(rows, list) else rows["checkpoints"]
    sizes = {r["name"]: r["bytes"] for r in rows}
    assert sizes == {n: storage.size(f"{n}/{n}") for n in ("a.h5", "b.h5")}
    assert all(n > 32 * 4 * 4 for n in sizes.values())
