"""A restore parses each manifest once, however many layers read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint.ondisk import manifest


def test_restore_latest_parses_each_manifest_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        for step in range(3):
            mgr.save({"w": np.full(4, step)}, step=step)
    manifest._PARSED.clear()
    parsed: list[str] = []
    real = manifest._parse

    def counting(data: bytes, *, where: str) -> manifest.Manifest:
        parsed.append(where)
        return real(data, where=where)

    monkeypatch.setattr(manifest, "_parse", counting)
    with safepoint.CheckpointManager(tmp_path) as mgr:
        ckpt = mgr.restore()
    assert ckpt is not None and ckpt.step == 2
    assert sorted(parsed) == sorted(set(parsed)), parsed  # listing + reading: once each
    assert len(parsed) == 3


def test_changed_bytes_are_parsed_again(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"w": np.zeros(2)}, step=1, metrics={"loss": 1.0})
    path = tmp_path / "step-00000001" / "manifest.json"
    first = manifest.parse(path.read_bytes(), where="m")
    edited = path.read_bytes().replace(b'"loss": 1.0', b'"loss": 2.0')
    with pytest.raises(safepoint.CorruptCheckpointError, match="checksum"):
        manifest.parse(edited, where="m")  # parsed (and refused), not served from the cache
    assert manifest.parse(path.read_bytes(), where="m") is first
