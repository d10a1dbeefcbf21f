"""The `safepoint` command line: listing, showing, verifying and cleaning a root."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import safepoint
from safepoint.cli import main


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "run"
    mgr = safepoint.CheckpointManager(path, monitor="val_loss")
    for step, loss in [(1, 0.9), (2, 0.5), (3, 0.7)]:
        mgr.save(
            {"w": np.full((4, 4), step, np.float32), "step": step},
            step=step,
            epoch=step,
            metrics={"val_loss": loss},
        )
    mgr.close()
    return path


def test_ls_lists_in_order_and_marks_best(root, capsys):
    assert main(["ls", str(root), "--monitor", "val_loss"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in out[1:]]
    assert names == ["step-00000001", "step-00000002", "step-00000003"]
    assert "(best)" in out[2] and "(best)" not in out[1] + out[3]


def test_ls_json(root, capsys):
    assert main(["ls", str(root), "--json", "--monitor", "val_loss"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [i["step"] for i in items] == [1, 2, 3]
    assert [i["best"] for i in items] == [False, True, False]
    assert all(i["bytes"] > 64 for i in items)


def test_ls_empty_root(tmp_path, capsys):
    assert main(["ls", str(tmp_path)]) == 0
    assert "No committed checkpoints" in capsys.readouterr().out
    assert main(["ls", str(tmp_path / "nothing")]) == 3  # a typo is not an empty run
    assert "does not exist" in capsys.readouterr().err


def test_show_prints_tensors_and_metrics(root, capsys):
    assert main(["show", str(root / "step-00000002")]) == 0
    out = capsys.readouterr().out
    assert "val_loss=0.5" in out and "float32" in out and "[4, 4]" in out


def test_show_json_is_the_manifest(root, capsys):
    assert main(["show", str(root / "step-00000002"), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["step"] == 2 and body["format"] == "safepoint"


def test_show_missing_checkpoint_exit_code(root, capsys):
    code = main(["show", str(root / "step-00000099")])
    assert code == safepoint.CheckpointNotFoundError.exit_code == 3
    assert "No checkpoint named" in capsys.readouterr().err


def test_verify_ok_then_corrupt(root, capsys):
    assert main(["verify", str(root)]) == 0
    assert "3 of 3 checkpoints verified" in capsys.readouterr().out
    payload = root / "step-00000002" / "model-00000.safetensors"
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0x01
    payload.write_bytes(bytes(data))
    assert main(["verify", str(root)]) == safepoint.CorruptCheckpointError.exit_code
    out = capsys.readouterr().out
    assert "FAILED  step-00000002" in out and "Checksum mismatch" in out
    assert main(["verify", str(root / "step-00000001")]) == 0


def test_verify_json(root, capsys):
    os.remove(root / "step-00000003" / "manifest.json")
    assert main(["verify", str(root), "--json"]) == safepoint.IncompleteCheckpointError.exit_code
    items = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert items["step-00000001"]["ok"] and not items["step-00000003"]["ok"]


def test_gc_removes_leftovers_only(root, capsys):
    (root / "step-00000004.tmp-deadbeef").mkdir()
    (root / ".trash-step-00000000-cafe").mkdir()
    assert main(["gc", str(root)]) == 0
    assert "2 leftover" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "step-00000001",
        "step-00000002",
        "step-00000003",
    ]


def test_log_prints_saves(root, capsys):
    assert main(["log", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["save"] * 3


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("ls", "show", "verify", "diff", "convert", "plot", "gc", "log", "demo"):
        assert command in out


def test_diff_reports_changed_tensors_and_metrics(root, capsys):
    assert main(["diff", str(root / "step-00000001"), str(root / "step-00000002")]) == 1
    out = capsys.readouterr().out
    assert "~ tensor w: 16 of 16 values differ, max |a-b| = 1" in out
    assert "~ metric val_loss: 0.9 -> 0.5" in out
    assert "~ non-tensor state differs" in out
    assert main(["diff", str(root / "step-00000002"), str(root / "step-00000002")]) == 0
    assert "identical" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["hdf5", "safetensors"])
def test_convert_round_trips_through_the_other_format(root, tmp_path, capsys, fmt):
    pytest.importorskip("h5py")
    src = root / "step-00000002"
    mid = tmp_path / "other" / "as-hdf5"
    back = tmp_path / "other" / "back"
    assert main(["convert", str(src), "--to", "hdf5", "--out", str(mid)]) == 0
    assert (mid / "model-00000.h5").exists()
    target = back if fmt == "safetensors" else mid
    if fmt == "safetensors":
        assert main(["convert", str(mid), "--to", "safetensors", "--out", str(back)]) == 0
    loaded, original = safepoint.load(target), safepoint.load(src)
    assert loaded["step"] == original["step"] == 2
    np.testing.assert_array_equal(loaded["w"], original["w"])
    assert main(["diff", str(src), str(target)]) == 0
    assert main(["verify", str(target)]) == 0
    # converting onto an existing path is refused
    assert main(["convert", str(src), "--to", "hdf5", "--out", str(mid)]) == 2


def test_convert_refuses_pickle_files_without_opening_them(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = tmp_path / "model.pt"
    # A pickle whose loading would create the marker file.
    payload.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    code = main(["convert", str(payload), "--to", "safetensors"])
    assert code == safepoint.IncompatibleCheckpointError.exit_code
    assert "never opens pickle" in capsys.readouterr().err
    with pytest.raises(safepoint.IncompatibleCheckpointError, match=r"torch\.load"):
        safepoint.load(payload)
    assert not marker.exists()


def test_plot_draws_every_saved_metric(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the built-in SVG renderer
    out = tmp_path / "m.svg"
    assert main(["plot", str(root), "--out", str(out)]) == 0
    assert "(3 points, 1 series; built-in SVG)" in capsys.readouterr().out
    svg = out.read_text()
    assert svg.startswith("<svg") and 'data-metric="val_loss"' in svg
    assert svg.count("<circle") == 3


def test_every_argument_of_every_command_says_what_it_takes():
    import argparse

    from safepoint.cli.commands import parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, (name, action.dest)


def test_diff_json_lists_each_change_as_a_record(root, tmp_path, capsys):
    mgr = safepoint.CheckpointManager(tmp_path / "other")
    mgr.save({"w": np.full((4, 4), 2, np.float32), "v": np.ones(2), "step": 2}, step=2, epoch=2,
             metrics={"val_loss": 0.5})  # fmt: skip
    mgr.close()
    a, b = root / "step-00000002", tmp_path / "other" / "step-00000002"
    assert main(["diff", "--json", str(a), str(b)]) == 1
    body = json.loads(capsys.readouterr().out)
    assert body["identical"] is False and body["a"] == str(a) and body["b"] == str(b)
    assert {"kind": "tensor", "key": "v", "change": "only_in_b"} in body["changes"]
    assert any(c["kind"] == "state" for c in body["changes"])
    assert main(["diff", "--json", str(a), str(a)]) == 0
    assert json.loads(capsys.readouterr().out)["changes"] == []


def test_an_hdf5_checkpoint_without_h5py_is_incompatible_not_a_traceback(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("h5py")
    mgr = safepoint.CheckpointManager(tmp_path, format="hdf5")
    ckpt = mgr.save({"w": np.zeros(3)}, step=1)
    mgr.close()
    script = (
        "import sys; sys.modules['h5py'] = None\n"
        "from safepoint.cli.commands import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for argv in (["diff", ckpt.path, ckpt.path], ["verify", "--deep", ckpt.path]):
        proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True)
        assert proc.returncode == safepoint.IncompatibleCheckpointError.exit_code, proc.stderr
        assert "Traceback" not in proc.stderr and "h5py" in proc.stderr + proc.stdout


def test_convert_into_a_live_root_takes_the_next_seq_and_the_lock(tmp_path):
    pytest.importorskip("h5py")
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    for step in (1, 2):
        mgr.save({"w": np.full(4, step, np.float32)}, step=step)
    # the manager holds the writer lock: converting into its root from another process
    # (the CLI) must wait its turn (writers of one process share the lock, issue 10 item 8)
    argv = ["convert", str(root / "step-00000001"), "--to", "hdf5", "--out", str(root / "copy")]
    other = subprocess.run([sys.executable, "-m", "safepoint.cli", *argv], capture_output=True)
    assert other.returncode == safepoint.StorageError.exit_code, other.stderr
    mgr.close()
    assert (
        main(["convert", str(root / "step-00000001"), "--to", "hdf5", "--out", str(root / "copy")])
        == 0
    )
    listed = safepoint.CheckpointManager(root).checkpoints()
    assert [(c.name, c.seq) for c in listed] == [
        ("step-00000001", 1),
        ("step-00000002", 2),
        ("copy", 3),
    ]


def test_convert_defaults_to_the_current_directory(tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    root = tmp_path / "run"
    safepoint.CheckpointManager(root).save({"w": np.ones(2)}, step=1)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["convert", str(root / "step-00000001"), "--to", "hdf5"]) == 0
    assert (work / "step-00000001-hdf5" / "manifest.json").exists()
    assert sorted(p.name for p in root.iterdir()) == ["safepoint-log.jsonl", "step-00000001"]
