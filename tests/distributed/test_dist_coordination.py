"""The manager's coordination seam: no process group, one process; a Collective passed in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safepoint
from safepoint.manager import coordination


class _Recording:
    rank, world_size = 0, 2

    def __init__(self) -> None:
        self.calls: list[str] = []

    def save(self, manager: Any, state: Any, **kw: Any) -> str:
        self.calls.append("save")
        return "saved"

    def restore(self, manager: Any, state: Any, **kw: Any) -> str:
        self.calls.append("restore")
        return "restored"


def test_single_process_has_no_collective(tmp_path: Path) -> None:
    assert coordination.find(None) is None
    with safepoint.CheckpointManager(tmp_path) as mgr:
        assert mgr.collective is None


def test_an_explicit_collective_runs_save_and_restore(tmp_path: Path) -> None:
    coll = _Recording()
    with safepoint.CheckpointManager(tmp_path, group=coll) as mgr:
        assert mgr.save({"x": 1}, step=1) == "saved"
        assert mgr.restore({"x": 1}) == "restored"
    assert coll.calls == ["save", "restore"]
    assert not list(tmp_path.iterdir()) or all(
        p.name.startswith(".") or p.suffix == ".jsonl" for p in tmp_path.iterdir()
    )
