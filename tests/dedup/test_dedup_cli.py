"""The CLI on a dedup root: ls own vs shared bytes, gc reclaims unreferenced blobs,
verify names a damaged blob, convert --standalone exports a self-contained copy."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import safepoint
from safepoint.cli.commands import main
from safepoint.ondisk.names import BLOBS
from safepoint_testing import assert_same

torch = pytest.importorskip("torch")


def _root(tmp_path: Path, keep: safepoint.Keep | None = None) -> Path:
    root = tmp_path / "run"
    frozen = torch.arange(4096, dtype=torch.float32)
    with safepoint.CheckpointManager(root, dedup=True, keep=keep) as mgr:
        for step in range(3):
            mgr.save({"frozen": frozen, "live": torch.full((256,), float(step))}, step=step)
    return root


def test_ls_shows_own_and_shared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _root(tmp_path)
    assert main(["ls", str(root), "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    for item in items:
        assert item["shared_bytes"] > 4096 * 4 > item["own_bytes"] > 256 * 4
        assert item["own_bytes"] + item["shared_bytes"] == item["bytes"]
    assert main(["ls", str(root)]) == 0
    assert "shared" in capsys.readouterr().out


def test_gc_reclaims_unreferenced_blobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _root(tmp_path, keep=safepoint.Keep(last=1))
    before = len(os.listdir(root / BLOBS))
    # step 0's "live" was a blob; later steps' changed "live" went into their own files
    # (deleted with them), so retention left one blob that nothing references
    assert main(["gc", str(root)]) == 0
    assert "1 unreferenced blobs removed" in capsys.readouterr().out
    assert len(os.listdir(root / BLOBS)) == before - 1
    assert main(["verify", str(root)]) == 0
    assert main(["gc", str(root)]) == 0  # nothing left to free
    assert "blobs removed" not in capsys.readouterr().out


def test_verify_names_missing_blob_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _root(tmp_path)
    (root / "step-00000001" / "model-00000.safetensors").unlink()  # a blob link
    assert main(["verify", str(root)]) != 0
    out = capsys.readouterr()
    assert "step-00000001/model-00000.safetensors" in out.out + out.err


def test_convert_standalone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _root(tmp_path)
    out = tmp_path / "export"
    assert main(["convert", "--standalone", str(root / "step-00000002"), "--out", str(out)]) == 0
    shutil.rmtree(root)  # nothing of the root is needed any more
    got = safepoint.load(out)
    assert float(got["live"][0]) == 2.0
    assert_same(torch.arange(4096, dtype=torch.float32).numpy(), got["frozen"])
    assert all(f.stat().st_nlink == 1 for f in out.iterdir())
    assert main(["convert", str(out), "--out", str(tmp_path / "x")]) != 0
    assert "--standalone" in capsys.readouterr().err
