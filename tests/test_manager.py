"""The CheckpointManager API as DESIGN.md fixes it: saving, listing, restoring, names,
modes, the run log, the writer lock, stale staging directories and the HDF5 format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint.storage.local import TMP_MARK
from safepoint_testing import listing


def small_state(value: float) -> dict[str, object]:
    return {"w": np.full((3, 2), value, dtype=np.float32), "note": f"v{value}", "epoch": 1}


def test_save_returns_checkpoint_and_lists_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as mgr:
        assert mgr.checkpoints() == [] and mgr.latest() is None
        ckpt = mgr.save(small_state(1.0), step=12, epoch=3, metrics={"val_acc": 0.71})
        assert ckpt.name == "step-00000012"
        assert ckpt.path == str(root / "step-00000012")
        assert (ckpt.step, ckpt.epoch, ckpt.metrics) == (12, 3, {"val_acc": 0.71})
        assert ckpt.created > 0
        assert [c.name for c in mgr.checkpoints()] == ["step-00000012"]
        assert mgr.latest() == ckpt
        assert (root / "step-00000012" / "manifest.json").is_file()


def test_restore_by_latest_best_name_and_step(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "run", monitor="val_loss") as mgr:
        for step, loss in [(1, 0.9), (2, 0.3), (3, 0.5)]:
            mgr.save(small_state(step), step=step, metrics={"val_loss": loss})
        assert mgr.best() is not None and mgr.best().step == 2  # type: ignore[union-attr]
        picks = {
            "latest": mgr.restore(),
            "best": mgr.restore(checkpoint="best"),
            "name": mgr.restore(checkpoint="step-00000001"),
            "step": mgr.restore(checkpoint=3),
        }
    steps = {k: (c.step, float(c.state["w"][0, 0])) for k, c in picks.items() if c}
    assert steps == {"latest": (3, 3.0), "best": (2, 2.0), "name": (1, 1.0), "step": (3, 3.0)}


def test_restore_into_state_updates_arrays(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(small_state(4.0), step=1)
        target = small_state(0.0)
        w = target["w"]
        ckpt = mgr.restore(target)
    assert ckpt is not None and target["w"] is w and float(w[0, 0]) == 4.0
    assert target["note"] == "v4.0"


def test_missing_checkpoints(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "run", monitor="val_loss") as mgr:
        with pytest.raises(safepoint.CheckpointNotFoundError):
            mgr.restore()
        assert mgr.restore(missing_ok=True) is None
        assert mgr.restore(checkpoint="best", missing_ok=True) is None
        mgr.save(small_state(1.0), step=1)
        with pytest.raises(safepoint.CheckpointNotFoundError):
            mgr.restore(checkpoint=7)
        with pytest.raises(safepoint.CheckpointNotFoundError):
            mgr.restore(checkpoint="step-00000009")
        with pytest.raises(FileNotFoundError):
            mgr.restore(checkpoint="nothing-here")


def test_restore_best_without_monitor_is_config_error(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(small_state(1.0), step=1)
        with pytest.raises(safepoint.ConfigError, match="monitor"):
            mgr.restore(checkpoint="best")


def test_verify_wait_close_and_context_manager(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    mgr.save(small_state(1.0), step=1)
    mgr.save(small_state(2.0), step=2)
    mgr.wait()
    results = mgr.verify()
    assert [(r.name, r.ok) for r in results] == [("step-00000001", True), ("step-00000002", True)]
    mgr.close()
    mgr.close()  # idempotent
    with pytest.raises(safepoint.ConfigError, match="closed"):
        mgr.save(small_state(3.0), step=3)
    # the lock is released on close: another manager can write
    with safepoint.CheckpointManager(root) as other:
        other.save(small_state(3.0), step=3)
    # ... and on leaving the with block
    with safepoint.CheckpointManager(root) as third:
        third.save(small_state(4.0), step=4)
        assert [c.step for c in third.checkpoints()] == [1, 2, 3, 4]


def test_step_defaults_to_sequence(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        a = mgr.save(small_state(1.0))
        b = mgr.save(small_state(2.0))
    assert (a.step, b.step) == (1, 2)


# ----------------------------------------------------------------- names and templates
def test_keras_style_template(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root, name="weights-{epoch:02d}-{val_acc:.2f}") as mgr:
        ckpt = mgr.save(small_state(1.0), step=140, epoch=7, metrics={"val_acc": 0.83858})
        assert ckpt.name == "weights-07-0.84"
        assert (root / "weights-07-0.84").is_dir()
        assert mgr.restore(checkpoint="weights-07-0.84") is not None


@pytest.mark.parametrize(
    "template",
    [
        "../escape-{step}",
        "a/{step}",
        "/abs/{step}",
        "x\x00{step}",
        "{step.__class__}",
        "{step[0]}",
        "{step:{epoch}}",
        "",
        "a" * 256 + "{step}",
        "{step",
    ],
    ids=["dotdot", "slash", "absolute", "nul", "attr", "index", "nested", "empty", "long", "brace"],
)
def test_unsafe_templates_fail_before_io(tmp_path: Path, template: str) -> None:
    root = tmp_path / "run"
    with pytest.raises(safepoint.ConfigError):
        mgr = safepoint.CheckpointManager(root, name=template)
        mgr.save(small_state(1.0), step=1)
    assert not root.exists()


@pytest.mark.parametrize(
    ("template", "metrics"),
    [
        ("{tag}", {"tag": ".."}),
        ("{tag}", {"tag": "../../etc"}),
        ("{tag}-x", {"tag": "a/b"}),
        ("{tag}", {"tag": "/abs"}),
        ("{tag}", {"tag": "nul\x00"}),
        ("{tag}", {"tag": "x" * 300}),
        ("{tag}", {"tag": ".hidden"}),
        ("{missing}-{step}", {}),
        ("{val_acc:d}", {"val_acc": 0.5}),
    ],
)
def test_unsafe_formatted_names_fail_before_io(
    tmp_path: Path, template: str, metrics: dict[str, object]
) -> None:
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root, name=template)
    with pytest.raises(safepoint.ConfigError):
        mgr.save(small_state(1.0), step=1, metrics=metrics)
    assert not root.exists()


@pytest.mark.parametrize(
    "name", ["..", "../x", "/etc", "a/b", "x\x00", "y" * 256, ".hidden", "step-1.tmp-abcd"]
)
def test_unsafe_names_in_restore_are_config_errors(tmp_path: Path, name: str) -> None:
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(small_state(1.0), step=1)
        with pytest.raises(safepoint.ConfigError):
            mgr.restore(checkpoint=name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": -1}, "step"),
        ({"step": 1.5}, "step"),
        ({"step": True}, "step"),
        ({"epoch": "3"}, "epoch"),
        ({"metrics": [1]}, "metrics"),
        ({"metrics": {"acc": object()}}, "acc"),
    ],
)
def test_bad_save_arguments(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    with pytest.raises(safepoint.ConfigError, match=match):
        mgr.save(small_state(1.0), **kwargs)  # type: ignore[arg-type]
    assert not root.exists()


# ----------------------------------------------------------------- monitor and mode
@pytest.mark.parametrize(
    ("monitor", "mode"),
    [
        ("loss", "min"),
        ("val_loss", "min"),
        ("acc", "max"),
        ("val_acc", "max"),
        ("accuracy", "max"),
        ("val_accuracy", "max"),
        ("auc", "max"),
        ("val_precision", "max"),
        ("recall", "max"),
        ("val_f1", "max"),
    ],
)
def test_auto_mode_follows_keras(tmp_path: Path, monitor: str, mode: str) -> None:
    mgr = safepoint.CheckpointManager(tmp_path / "run", monitor=monitor, mode="auto")
    assert mgr.mode == mode
    for step, value in [(1, 0.2), (2, 0.8), (3, 0.5)]:
        mgr.save(small_state(step), step=step, metrics={monitor: value})
    best = mgr.best()
    assert best is not None and best.step == (1 if mode == "min" else 2)
    mgr.close()


def test_unknown_metric_with_auto_mode_asks_for_mode(tmp_path: Path) -> None:
    with pytest.raises(safepoint.ConfigError, match="mode='min' or mode='max'"):
        safepoint.CheckpointManager(tmp_path / "run", monitor="wiggliness")
    mgr = safepoint.CheckpointManager(tmp_path / "run", monitor="wiggliness", mode="max")
    assert mgr.mode == "max"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["maximum", "MIN", "", None, 1])
def test_bad_mode_is_config_error(tmp_path: Path, mode: object) -> None:
    with pytest.raises(safepoint.ConfigError, match="mode"):
        safepoint.CheckpointManager(tmp_path / "run", monitor="val_loss", mode=mode)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"format": "pickle"},
        {"keep": "last"},
        {"keep": safepoint.Keep(best=1)},  # best without a monitor
        {"shard_bytes": 0},
    ],
)
def test_bad_constructor_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(safepoint.ConfigError):
        safepoint.CheckpointManager(tmp_path / "run", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs", [{}, {"last": 0}, {"best": -1}, {"every": 1.5}])
def test_bad_keep(kwargs: dict[str, object]) -> None:
    with pytest.raises(safepoint.ConfigError):
        safepoint.Keep(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------- the run log
def read_log(root: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (root / "safepoint-log.jsonl").read_text().splitlines()]


def test_run_log_records_saves_and_deletes(tmp_path: Path) -> None:
    root = tmp_path / "run"
    keep = safepoint.Keep(last=1)
    with safepoint.CheckpointManager(root, keep=keep) as mgr:
        mgr.save(small_state(1.0), step=1, metrics={"loss": 0.5})
        mgr.save(small_state(2.0), step=2, metrics={"loss": float("nan")})
    events = [(e["event"], e["name"]) for e in read_log(root)]
    assert events == [
        ("save", "step-00000001"),
        ("save", "step-00000002"),
        ("delete", "step-00000001"),
    ]
    first = read_log(root)[0]
    assert first["metrics"] == {"loss": 0.5} and first["step"] == 1


def test_torn_last_log_line_is_ignored(tmp_path: Path) -> None:
    from safepoint.storage import runlog

    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as mgr:
        mgr.save(small_state(1.0), step=1)
        with open(root / "safepoint-log.jsonl", "ab") as f:
            f.write(b'{"event": "save", "na')  # a crash tore the last line
        assert [e["event"] for e in runlog.read(mgr.storage)] == ["save"]
        mgr.save(small_state(2.0), step=2)  # appending after a torn line still works
        assert [e.get("name") for e in runlog.read(mgr.storage)] == [
            "step-00000001",
            "step-00000002",
        ]
        assert [c.step for c in mgr.checkpoints()] == [1, 2]


# ----------------------------------------------------------------- one writer per root
def test_second_writer_process_fails_clearly(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as mgr:
        mgr.save(small_state(1.0), step=1)  # takes the writer lock
        script = textwrap.dedent(
            f"""
            import numpy as np, safepoint
            mgr = safepoint.CheckpointManager({str(root)!r})
            print(len(mgr.checkpoints()))  # readers are always welcome
            try:
                mgr.save({{"w": np.ones(2)}}, step=2)
            except safepoint.StorageError as exc:
                print("StorageError", exc.stage, isinstance(exc, OSError))
                print(exc)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        ).stdout.splitlines()
        assert out[0] == "1"
        assert out[1] == "StorageError lock True"
        assert "Another writer holds the lock" in out[2]
        assert [c.step for c in mgr.checkpoints()] == [1]
        assert not any(TMP_MARK in n for n in listing(root))


# ----------------------------------------------------------------- staging leftovers
def test_stale_staging_dirs_are_never_listed_and_cleaned(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as mgr:
        mgr.save(small_state(1.0), step=1)
    # a crashed writer left a staging dir (with a complete-looking manifest!) and trash
    stale = root / f"step-00000002{TMP_MARK}dead"
    os.mkdir(stale)
    for f in (root / "step-00000001").iterdir():
        (stale / f.name).write_bytes(f.read_bytes())
    (root / ".trash-step-00000000-beef").mkdir()
    (root / "no-manifest").mkdir()
    reader = safepoint.CheckpointManager(root)
    assert [c.name for c in reader.checkpoints()] == ["step-00000001"]
    assert reader.restore() is not None and reader.restore().step == 1  # type: ignore[union-attr]
    assert stale.exists()  # readers never delete
    with safepoint.CheckpointManager(root) as writer:
        writer.save(small_state(3.0), step=3)
    assert not stale.exists()
    assert not (root / ".trash-step-00000000-beef").exists()
    assert not any(TMP_MARK in n for n in listing(root))


def test_same_step_save_replaces_atomically(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as mgr:
        mgr.save(small_state(1.0), step=5)
        mgr.save(small_state(2.0), step=6)
        again = mgr.save(small_state(9.0), step=5)
        names = [c.name for c in mgr.checkpoints()]
        restored = mgr.restore(checkpoint="step-00000005")
        latest = mgr.restore()
    assert names == ["step-00000006", "step-00000005"]  # ordered by seq, not name
    assert restored is not None and float(restored.state["w"][0, 0]) == 9.0
    assert latest is not None and latest.name == "step-00000005" and latest.seq == again.seq
    leftovers = [n for n in listing(root) if n.startswith(".") or TMP_MARK in n]
    assert leftovers == []


# ----------------------------------------------------------------- formats and load()
def test_hdf5_format_roundtrip(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    torch = pytest.importorskip("torch")
    state = {
        "w": np.arange(12, dtype=np.float64).reshape(3, 4),
        "t": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "c": torch.tensor([1 + 2j], dtype=torch.complex64),
        "e": np.zeros((0, 2), dtype=np.int8),
        "s": np.int16(-3),
        "meta": {"lr": 1e-3, 1: (None, True)},
    }
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root, format="hdf5") as mgr:
        ckpt = mgr.save(state, step=1)
        back = mgr.restore()
        assert mgr.verify()[0].ok
    assert back is not None
    from safepoint_testing import assert_same

    assert_same(state, back.state)
    files = sorted(p.name for p in Path(ckpt.path).iterdir())
    assert files == ["manifest.json", "model-00000.h5"]


def test_load_returns_numpy_tree(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        ckpt = mgr.save(
            {"t": torch.arange(4, dtype=torch.float32), "a": np.ones(2), "x": {"y": [1, "z"]}},
            step=1,
        )
    tree = safepoint.load(ckpt.path)
    assert isinstance(tree["t"], np.ndarray) and tree["t"].tolist() == [0, 1, 2, 3]
    assert isinstance(tree["a"], np.ndarray)
    assert tree["x"] == {"y": [1, "z"]}
    assert isinstance(safepoint.load(ckpt.path, as_numpy=False)["t"], torch.Tensor)
    with pytest.raises(safepoint.CheckpointNotFoundError):
        safepoint.load(tmp_path / "run" / "nope")


def test_safetensors_payload_is_plain_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        ckpt = mgr.save({"layer": {"w": np.arange(6, dtype=np.float32)}}, step=1)
    with safe_open(os.path.join(ckpt.path, "model-00000.safetensors"), "np") as f:
        assert np.array_equal(f.get_tensor("layer/w"), np.arange(6, dtype=np.float32))


def test_sharding_splits_payload_files(tmp_path: Path) -> None:
    state = {f"w{i}": np.full(256, i, dtype=np.float32) for i in range(5)}
    with safepoint.CheckpointManager(tmp_path / "run", shard_bytes=2048) as mgr:
        ckpt = mgr.save(state, step=1)
        back = mgr.restore()
    shards = sorted(p.name for p in Path(ckpt.path).glob("model-*.safetensors"))
    assert len(shards) == 3
    assert back is not None
    for k, v in state.items():
        assert np.array_equal(back.state[k], v)


def test_huge_int_metrics_do_not_break_saves(tmp_path: Path) -> None:
    """An int metric beyond float range is kept, and is simply never "best"."""
    keep = safepoint.Keep(last=1, best=1)
    with safepoint.CheckpointManager(tmp_path / "run", monitor="val_loss", keep=keep) as mgr:
        mgr.save(small_state(1.0), step=1, metrics={"val_loss": 0.5})
        mgr.save(small_state(2.0), step=2, metrics={"val_loss": 10**400, "seen": 10**5000})
        mgr.save(small_state(3.0), step=3, metrics={"val_loss": 0.7})
        assert [c.step for c in mgr.checkpoints()] == [1, 3]
        best = mgr.best()
        assert best is not None and best.step == 1
    listed = safepoint.CheckpointManager(tmp_path / "run").checkpoints()
    assert listed[0].metrics == {"val_loss": 0.5}


def test_huge_int_metric_roundtrips_in_manifest(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(small_state(1.0), step=1, metrics={"seen": 10**5000 + 1})
        assert mgr.checkpoints()[0].metrics["seen"] == 10**5000 + 1


@pytest.mark.parametrize("which", [5, "step-00000005"])
def test_missing_ok_covers_steps_and_names(tmp_path, which):
    mgr = safepoint.CheckpointManager(tmp_path / "run")
    assert mgr.restore(checkpoint=which, missing_ok=True) is None
    with pytest.raises(safepoint.CheckpointNotFoundError):
        mgr.restore(checkpoint=which)
    mgr.save({"x": 1}, step=1)
    assert mgr.restore(checkpoint=which, missing_ok=True) is None
    assert mgr.restore(checkpoint=1).state == {"x": 1}


class Counter:
    def __init__(self, fail: bool = False) -> None:
        self.value = 0
        self.fail = fail

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.fail:
            raise ValueError("refusing this state")
        self.value = state["value"]


def test_a_failed_restore_names_what_was_already_loaded(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path / "run")
    a, b = Counter(), Counter()
    a.value = b.value = 7
    mgr.save({"a": a, "b": b}, step=1)
    target = {"a": Counter(), "b": Counter(fail=True)}
    with pytest.raises(
        safepoint.StateMismatchError,
        match=r"Already loaded before this "
        r"failure: \['a'\]",
    ) as exc:
        mgr.restore(target)
    assert exc.value.mismatched == ["b"]
    with pytest.raises(safepoint.StateMismatchError, match="Nothing else was loaded"):
        mgr.restore({"b": Counter(fail=True)})


def test_an_hdf5_checkpoint_without_h5py_is_incompatible_and_latest_falls_back(
    tmp_path, monkeypatch
):
    pytest.importorskip("h5py")
    root = tmp_path / "run"
    safepoint.CheckpointManager(root).save({"x": np.ones(2)}, step=1)
    safepoint.CheckpointManager(root, format="hdf5").save({"x": np.zeros(2)}, step=2)
    from safepoint import formats

    real_get = formats.get

    def no_h5py(name: str):
        if name == "hdf5":
            raise safepoint.ConfigError("The 'hdf5' format needs h5py.")
        return real_get(name)

    monkeypatch.setattr(formats, "get", no_h5py)
    mgr = safepoint.CheckpointManager(root)
    with pytest.raises(safepoint.IncompatibleCheckpointError, match="needs h5py"):
        mgr.restore(checkpoint=2)
    np.testing.assert_array_equal(mgr.restore().state["x"], np.ones(2))


def test_a_manager_dropped_without_close_releases_the_root(tmp_path):
    import gc

    root = tmp_path / "run"
    safepoint.CheckpointManager(root).save({"x": 1}, step=1)  # never closed
    gc.collect()
    assert safepoint.CheckpointManager(root).save({"x": 2}, step=2).step == 2
