"""safepoint.keras.ModelCheckpoint against Keras 3's: same lines, same files, safer writes."""

from __future__ import annotations

import json
import os
import re
import warnings

import keras
import numpy as np
import pytest
from seed_data import pima

import safepoint
from safepoint.keras import ModelCheckpoint

EPOCHS = 3


@pytest.fixture(scope="module")
def xy() -> tuple[np.ndarray, np.ndarray]:
    x, y = pima()
    return x[:300], y[:300]


def build(*, dropout: bool = False) -> keras.Model:
    keras.utils.set_random_seed(7)
    layers = [keras.Input((8,)), keras.layers.Dense(6, activation="relu")]
    if dropout:
        layers.append(keras.layers.Dropout(0.2))
    model = keras.Sequential([*layers, keras.layers.Dense(1, activation="sigmoid")])
    model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def fit(model: keras.Model, xy, callback, *, epochs: int = EPOCHS, val: bool = True, **kw):
    x, y = xy
    return model.fit(
        x,
        y,
        validation_split=0.33 if val else 0.0,
        epochs=epochs,
        batch_size=30,
        callbacks=[callback],
        verbose=0,
        **kw,
    )


def weights_equal(a: keras.Model, b: keras.Model) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights(), strict=True))


# ----------------------------------------------------------------------- Keras' lines
@pytest.mark.parametrize("best_only", [True, False])
def test_verbose_lines_are_keras_lines_character_for_character(
    xy, tmp_path, monkeypatch, capsys, best_only
):
    kw = dict(monitor="val_loss", verbose=1, save_best_only=best_only, save_weights_only=True)
    (tmp_path / "keras").mkdir()
    (tmp_path / "ours").mkdir()
    monkeypatch.chdir(tmp_path / "keras")
    fit(build(), xy, keras.callbacks.ModelCheckpoint("w-{epoch:02d}.weights.h5", **kw))
    theirs = capsys.readouterr().out
    monkeypatch.chdir(tmp_path / "ours")
    fit(build(), xy, ModelCheckpoint("w-{epoch:02d}.weights.h5", **kw))
    ours = capsys.readouterr().out
    assert ours == theirs
    assert "Epoch 1: val_loss improved from None to" in ours or not best_only
    assert "Epoch 3: finished saving model to w-03.weights.h5" in ours or best_only


def test_keras2_names_print_the_users_name_with_one_notice(xy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fit(
        build(),
        xy,
        keras.callbacks.ModelCheckpoint(
            "best.weights.h5",
            monitor="val_accuracy",
            verbose=1,
            save_best_only=True,
            save_weights_only=True,
            mode="max",
        ),
        epochs=4,
    )
    theirs = capsys.readouterr().out.replace("val_accuracy", "val_acc")
    with pytest.warns(UserWarning, match="'val_acc' -> 'val_accuracy'") as notices:
        cb = ModelCheckpoint(
            "imp-{epoch:02d}-{val_acc:.2f}.hdf5",
            monitor="val_acc",
            verbose=1,
            save_best_only=True,
            mode="max",
        )
        fit(build(), xy, cb, epochs=4)
    assert len([n for n in notices if "Keras 2 metric names" in str(n.message)]) == 1
    ours = capsys.readouterr().out
    improved = re.findall(r"Epoch (\d+): val_acc improved from \S+ to (\d\.\d+)", ours)
    assert improved, ours
    for epoch, value in improved:
        name = f"imp-{int(epoch):02d}-{float(value):.2f}.hdf5"
        assert f"saving model to {name}\n" in ours
        assert os.path.exists(name)
    # Same decisions as Keras with the new name; only the file names differ.
    strip = re.compile(r"(saving model to) \S+")
    assert strip.sub(r"\1 X", ours) == strip.sub(r"\1 X", theirs)


# ----------------------------------------------------------------------- every format
FORMATS = [
    ("legacy-model.hdf5", False),
    ("legacy-weights.h5", True),
    ("k3.weights.h5", True),
    ("model.keras", False),
]


@pytest.mark.parametrize(("filename", "weights_only"), FORMATS)
def test_every_format_loads_in_keras_and_in_the_manager(xy, tmp_path, filename, weights_only):
    model = build()
    path = tmp_path / filename
    fit(model, xy, ModelCheckpoint(path, save_weights_only=weights_only), epochs=2)
    fresh = build()
    fresh.optimizer.build(fresh.trainable_variables)  # Keras 3 files hold optimizer state too
    assert not weights_equal(fresh, model)
    fresh.load_weights(path)
    assert weights_equal(fresh, model)
    if filename.endswith(".keras"):
        assert weights_equal(keras.models.load_model(path), model)
    mgr = safepoint.CheckpointManager(tmp_path)
    (ckpt,) = mgr.checkpoints()
    assert (ckpt.name, ckpt.epoch, ckpt.step) == (filename, 2, 2)
    assert set(ckpt.metrics) == {"loss", "val_loss", "accuracy", "val_accuracy"}  # each once
    assert [v.ok for v in mgr.verify()] == [True]
    restored = mgr.restore()
    leaves = []

    def walk(node):
        for value in node.values():
            walk(value) if isinstance(value, dict) else leaves.append(value)

    walk(restored.state)
    kernel = model.get_weights()[0]
    assert any(np.array_equal(leaf, kernel) for leaf in leaves)
    assert safepoint.load(path).keys() == restored.state.keys()


def test_a_flipped_weight_is_caught_and_latest_falls_back(xy, tmp_path):
    fit(build(), xy, ModelCheckpoint(tmp_path / "w-{epoch}.weights.h5", save_weights_only=True))
    import h5py

    newest = tmp_path / f"w-{EPOCHS}.weights.h5"
    with h5py.File(newest, "r+") as h5:
        dset = h5["layers/dense/vars/0"]
        dset[0, 0] = dset[0, 0] + 1.0
    mgr = safepoint.CheckpointManager(tmp_path)
    bad = [v for v in mgr.verify() if not v.ok]
    assert [v.name for v in bad] == [newest.name]
    assert isinstance(bad[0].error, safepoint.CorruptCheckpointError)
    assert mgr.restore().name == f"w-{EPOCHS - 1}.weights.h5"
    with pytest.raises(safepoint.CorruptCheckpointError, match=newest.name):
        mgr.restore(checkpoint=newest.name)


# ----------------------------------------------------------------------- commit protocol
def test_a_failed_write_leaves_the_old_file_and_no_staging_file(xy, tmp_path, monkeypatch):
    from safepoint.keras import files

    path = tmp_path / "weights.best.hdf5"
    model = build()
    fit(model, xy, ModelCheckpoint(path), epochs=1)
    before = path.read_bytes()

    def torn(model, layout):
        def write(staged):
            with open(staged, "wb") as f:
                f.write(before[: len(before) // 2])
            raise OSError(28, "No space left on device")

        return write

    monkeypatch.setattr(files, "writer", torn)
    with pytest.raises(safepoint.StorageError, match="No space left"):
        fit(model, xy, ModelCheckpoint(path), epochs=1)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["safepoint-log.jsonl", "weights.best.hdf5"]


def test_stale_staging_files_of_a_killed_run_are_removed(xy, tmp_path):
    stale = tmp_path / ".sp.tmp-0123abcd.hdf5"
    stale.write_bytes(b"half a file")
    mine = tmp_path / "notes.tmp-0123abcd.hdf5"
    mine.write_bytes(b"a user's file")
    fit(build(), xy, ModelCheckpoint(tmp_path / "w.hdf5"), epochs=1)
    assert not stale.exists() and mine.exists()


def test_keep_prunes_the_files_it_wrote(xy, tmp_path):
    keep = safepoint.Keep(last=2)
    fit(build(), xy, ModelCheckpoint(tmp_path / "w-{epoch:02d}.keras", keep=keep), epochs=4)
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".keras"))
    assert names == ["w-03.keras", "w-04.keras"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_keep_best_keeps_the_best_file(xy, tmp_path):
    cb = ModelCheckpoint(
        tmp_path / "w-{epoch:02d}.weights.h5",
        save_weights_only=True,
        monitor="val_loss",
        keep=safepoint.Keep(last=1, best=1),
    )
    history = fit(build(), xy, cb, epochs=4)
    losses = history.history["val_loss"]
    best = f"w-{int(np.argmin(losses)) + 1:02d}.weights.h5"
    names = {n for n in os.listdir(tmp_path) if n.endswith(".h5")}
    assert names == {best, "w-04.weights.h5"}


# ----------------------------------------------------------------------- Keras' bugs
def test_integer_save_freq_with_save_best_only_works(xy, tmp_path, capsys):
    """Keras 3.15 crashes here: its metric direction is only set at an epoch's end."""
    cb = ModelCheckpoint(
        tmp_path / "b-{epoch}-{batch}.weights.h5",
        monitor="loss",
        save_best_only=True,
        save_weights_only=True,
        save_freq=3,
        verbose=1,
    )
    fit(build(), xy, cb, epochs=2)  # 7 batches per epoch
    out = capsys.readouterr().out
    assert "Epoch 1: loss improved from None to" in out
    saved = sorted(n for n in os.listdir(tmp_path) if n.endswith(".h5"))
    assert saved and "b-1-3.weights.h5" in saved
    assert all(re.fullmatch(r"b-[12]-[1-7]\.weights\.h5", n) for n in saved)


def test_a_monitor_that_never_appears_fails_at_the_end_of_the_first_epoch(xy, tmp_path):
    """Keras warns every epoch and saves every model; a best-only run must not do that."""
    seen: list[int] = []
    counter = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    cb = ModelCheckpoint(tmp_path / "w.weights.h5", monitor="val_loss", save_best_only=True,
                         save_weights_only=True)  # fmt: skip
    x, y = xy
    with pytest.raises(safepoint.ConfigError, match=r"'val_loss' but the logs of epoch 1") as err:
        build().fit(x, y, epochs=3, batch_size=30, callbacks=[counter, cb], verbose=0)
    assert "validation_data=" in str(err.value) and "Received: monitor='val_loss'" in str(err.value)
    assert seen == [0]
    assert not os.path.exists(tmp_path / "w.weights.h5")


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"filepath": "w.keras", "mode": "maximum"}, r"mode 'maximum' is unknown.*Received: mode="),
        ({"filepath": "w.keras", "save_weights_only": True}, r"Received: filepath=w\.keras\."),
        ({"filepath": "w.weights.h5"}, r"`\.weights\.h5`.*Received: filepath=w\.weights\.h5\."),
        ({"filepath": "w.pt"}, r"must end in `\.keras`.*Received: filepath=w\.pt\."),
        ({"filepath": "w.keras", "save_freq": 0}, r"Received: save_freq=0"),
        ({"filepath": "{epoch}/w.keras"}, r"Received: filepath=\{epoch\}/w\.keras"),
        ({"filepath": "w.keras", "keep": 3}, r"Received: keep=3"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, match):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(safepoint.ConfigError, match=match):
            ModelCheckpoint(**kwargs)


def test_a_template_field_that_is_not_a_metric_is_a_config_error(xy, tmp_path):
    cb = ModelCheckpoint(tmp_path / "w-{val_f1:.2f}.keras")
    with pytest.raises(safepoint.ConfigError, match=r"\['val_f1'\] are not logged.*Received: file"):
        fit(build(), xy, cb, epochs=1)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".keras")]


def test_import_safepoint_does_not_import_keras():
    import subprocess
    import sys

    code = "import sys, safepoint; print('keras' in sys.modules, 'h5py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def in_entry_data(path, pos: int) -> bool:
    """Whether byte ``pos`` of zip ``path`` is inside an entry's stored data."""
    import struct
    import zipfile

    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 :][:4])
            start = info.header_offset + 30 + name_len + extra_len
            if start <= pos < start + info.compress_size:
                return True
    return False


@pytest.mark.heavy
@pytest.mark.parametrize("filename", ["w.hdf5", "w.weights.h5", "w.keras"])
def test_every_flipped_byte_is_caught_before_hdf5_parses_it(xy, tmp_path, filename):
    weights_only = filename.endswith(".weights.h5")
    fit(build(), xy, ModelCheckpoint(tmp_path / filename, save_weights_only=weights_only), epochs=1)
    path = tmp_path / filename
    original = path.read_bytes()
    assert [v.ok for v in safepoint.CheckpointManager(tmp_path).verify()] == [True]
    positions = range(0, len(original), max(1, len(original) // 60))
    if filename.endswith(".keras"):
        # A zip's checksums cover what Keras reads: every entry's bytes (its own
        # directory records, such as timestamps, are not part of the model).
        positions = [p for p in range(len(original)) if in_entry_data(path, p)][::97]
    else:
        # Every byte of the manifest's tail and padding too: zeroed in the checksum,
        # they must be checked another way.
        from safepoint.catalog import singlefile

        mgr = safepoint.CheckpointManager(tmp_path)
        record = singlefile.read_manifest(mgr.storage, filename).extra["single_file"]
        end = record["offset"] + record["length"]
        positions = [*positions, *range(end - 40, end)]
    assert len(positions) > 30
    for pos in positions:
        damaged = bytearray(original)
        damaged[pos] ^= 0x10
        path.write_bytes(bytes(damaged))
        (result,) = safepoint.CheckpointManager(tmp_path).verify()
        assert not result.ok, f"a flip at byte {pos} of {len(original)} went unnoticed"
    path.write_bytes(original)
    assert [v.ok for v in safepoint.CheckpointManager(tmp_path).verify()] == [True]


def test_files_keras_wrote_itself_are_not_listed(xy, tmp_path):
    model = build()
    fit(model, xy, ModelCheckpoint(tmp_path / "ours.weights.h5", save_weights_only=True), epochs=1)
    model.save_weights(tmp_path / "theirs.weights.h5")
    model.save(tmp_path / "theirs.keras")
    mgr = safepoint.CheckpointManager(tmp_path)
    assert [c.name for c in mgr.checkpoints()] == ["ours.weights.h5"]
    assert [(v.name, v.ok) for v in mgr.verify()] == [("ours.weights.h5", True)]


def test_safepoint_ls_reports_the_size_of_single_file_checkpoints(xy, tmp_path, capsys):
    from safepoint.cli import main

    fit(build(), xy, ModelCheckpoint(tmp_path / "w.weights.h5", save_weights_only=True), epochs=1)
    assert main(["ls", str(tmp_path), "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["name"] == "w.weights.h5"
    assert item["bytes"] == os.path.getsize(tmp_path / "w.weights.h5") > 0


# ----------------------------------------------------------------------- run log, best
def drive(cb: ModelCheckpoint, model: keras.Model, losses: list[float]) -> None:
    """Run the callback's hooks by hand with chosen ``loss`` values, one per epoch."""
    cb.set_model(model)
    cb.on_train_begin()
    for epoch, loss in enumerate(losses):
        cb.on_epoch_begin(epoch)
        cb.on_epoch_end(epoch, {"loss": loss})
    cb.on_train_end()


def test_a_run_log_failure_never_fails_or_blocks_a_save(tmp_path, monkeypatch, caplog):
    from safepoint.storage import runlog

    def broken(*args, **kwargs):
        raise safepoint.StorageError("the log is gone (injected)", stage="log")

    monkeypatch.setattr(runlog, "record", broken)
    cb = ModelCheckpoint(tmp_path / "w.weights.h5", monitor="loss", save_best_only=True,
                         save_weights_only=True)  # fmt: skip
    drive(cb, build(), [0.5, 0.6, 0.4])  # save, skip, save (the skip is logged with it)
    assert sorted(os.listdir(tmp_path)) == ["w.weights.h5"]  # no staging file left
    (ckpt,) = safepoint.CheckpointManager(tmp_path).checkpoints()
    assert ckpt.epoch == 3 and ckpt.metrics["loss"] == 0.4
    assert "could not write the run log" in caplog.text


def test_a_failed_background_commit_does_not_become_the_best(tmp_path, monkeypatch):
    from safepoint.catalog import singlefile

    real = singlefile.finish
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise safepoint.StorageError("the disk failed (injected)", stage="fsync")
        return real(*args, **kwargs)

    monkeypatch.setattr(singlefile, "finish", fail_second)
    cb = ModelCheckpoint(tmp_path / "w.weights.h5", monitor="loss", save_best_only=True,
                         save_weights_only=True)  # fmt: skip
    model = build()
    cb.set_model(model)
    cb.on_train_begin()
    cb.on_epoch_end(0, {"loss": 0.5})
    cb.on_epoch_end(1, {"loss": 0.3})  # its commit fails in the background
    with pytest.raises(safepoint.StorageError, match="injected"):
        cb.on_epoch_end(2, {"loss": 0.4})
    assert cb.best == 0.5  # what the file on disk holds
    cb.on_epoch_end(2, {"loss": 0.4})  # better than the file on disk: saved
    cb.on_train_end()
    (ckpt,) = safepoint.CheckpointManager(tmp_path).checkpoints()
    assert ckpt.metrics["loss"] == 0.4


def test_a_failed_commit_nobody_waited_for_is_reported_at_exit(tmp_path, monkeypatch, capsys):
    from safepoint.catalog import singlefile
    from safepoint.storage import worker

    def failing(*args, **kwargs):
        raise safepoint.StorageError("the disk failed (injected)", stage="fsync")

    monkeypatch.setattr(singlefile, "finish", failing)
    cb = ModelCheckpoint(tmp_path / "w.weights.h5", save_weights_only=True)
    cb.set_model(build())
    cb.on_train_begin()
    cb.on_epoch_end(0, {"loss": 0.5})  # fit() then dies: on_train_end never runs
    worker._report_all()  # what the interpreter runs at exit
    err = capsys.readouterr().err
    assert "'w.weights.h5'" in err and "was NOT committed" in err and "injected" in err
