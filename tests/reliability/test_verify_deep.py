"""``safepoint verify --deep ROOT``: checksums, then a full read and rebuild of each state.

A manifest re-signed after an edit passes every checksum; only reading the tensors
against the payload headers and rebuilding the tree shows that it no longer describes
its files. ``--deep`` must catch what plain ``verify`` cannot, and agree with it on
sound and on bit-rotten checkpoints.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from faultkit import make_state

import safepoint
from safepoint.cli import main as cli


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    for step in (1, 2, 3):
        mgr.save(make_state(2, step, 32 << 10), step=step)
    mgr.close()
    return root


def _transpose_w(body):
    entry = body["tensors"]["model/w"]
    a, *rest = entry["shape"]
    assert not rest
    entry["shape"] = [a // 8, 8]  # same byte count, a different shape than the header's


def _swap_tensors(body):
    t = body["tensors"]
    t["model/b"]["name"], t["optimizer/exp_avg"]["name"] = (
        t["optimizer/exp_avg"]["name"],
        t["model/b"]["name"],
    )


@pytest.mark.parametrize("edit", [_transpose_w, _swap_tensors])
def test_deep_catches_what_checksums_cannot(root, tamper, capsys, edit):
    tamper(root / "step-00000002", edit)
    assert cli(["verify", str(root)]) == 0  # every checksum still matches
    capsys.readouterr()
    code = cli(["verify", "--deep", str(root)])
    out = capsys.readouterr().out
    assert code == safepoint.CorruptCheckpointError.exit_code, out
    assert "FAILED  step-00000002" in out and "2 of 3 checkpoints verified." in out
    code = cli(["verify", "--deep", str(root / "step-00000002")])
    assert code == safepoint.CorruptCheckpointError.exit_code
    assert cli(["verify", "--deep", str(root / "step-00000001")]) == 0


def test_deep_agrees_on_sound_and_rotten(root, capsys):
    assert cli(["verify", "--deep", "--json", str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in report] == [True, True, True]
    payload = root / "step-00000003" / "model-00000.safetensors"
    data = bytearray(payload.read_bytes())
    data[-5] ^= 0x10
    payload.write_bytes(bytes(data))
    assert cli(["verify", "--deep", "--json", str(root)]) == 5
    report = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in report] == [True, True, False]
    assert "Checksum mismatch" in report[2]["error"]


def test_deep_reads_hdf5_and_torch_states(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("h5py")
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root, format="hdf5")
    mgr.save({"w": torch.arange(6.0).reshape(2, 3), "n": np.int16(3), "x": [1, (2, 3)]}, step=1)
    mgr.close()
    assert cli(["verify", "--deep", str(root)]) == 0
    assert "1 of 1 checkpoints verified." in capsys.readouterr().out
