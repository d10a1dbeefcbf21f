"""Stale-entry cleanup removes only what safepoint created, recognisably, and never
while a writer is live (issue 10 item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint.cli import main as cli
from safepoint.storage.local import LocalStorage


def state(value: float) -> dict[str, object]:
    return {"w": np.full(4, value, dtype=np.float32)}


def _user_files(root: Path) -> list[Path]:
    """Folders and files a user may keep next to checkpoints, named like our leftovers."""
    made = []
    for name in ("results.tmp-old", ".trash-mine", "notes.tmp-1234abcd", ".trash-x-deadbeef"):
        (root / name).mkdir()
        (root / name / "data.csv").write_text("a user's numbers")
        made.append(root / name)
    (root / ".sp.tmp-0123456789abcdef").mkdir()  # our pattern, but a user's content
    (root / ".sp.tmp-0123456789abcdef" / "thesis.tex").write_text("do not delete")
    made.append(root / ".sp.tmp-0123456789abcdef")
    (root / "plain.tmp-0123").write_text("a file")
    made.append(root / "plain.tmp-0123")
    return made


@pytest.mark.parametrize("how", ["save", "gc"])
def test_user_entries_named_like_leftovers_survive_cleanup(tmp_path: Path, how: str) -> None:
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as mgr:
        mgr.save(state(1.0), step=1)
    made = _user_files(root)
    if how == "gc":
        assert cli(["gc", str(root)]) == 0
    else:
        with safepoint.CheckpointManager(root) as mgr:
            mgr.save(state(2.0), step=2)
    for path in made:
        assert path.exists(), path
    assert (root / "results.tmp-old" / "data.csv").read_text() == "a user's numbers"


def test_our_leftovers_are_still_removed(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as mgr:
        mgr.save(state(1.0), step=1)
    marked = root / ".sp.tmp-00000000000000aa"
    marked.mkdir()
    (marked / ".safepoint-marker").write_text('{"safepoint": 1, "kind": "stage", "name": "x"}')
    (marked / "model-00000.safetensors").write_bytes(b"half")
    empty_trash = root / ".trash-sp-00000000000000bb"
    empty_trash.mkdir()
    old = root / "step-00000002.tmp-0badcafe"
    old.mkdir()
    (old / "model-00000.safetensors").write_bytes(b"half")
    storage = LocalStorage(root)
    removed = storage.cleanup_stale()
    assert sorted(removed) == sorted([marked.name, empty_trash.name, old.name])
    assert sorted(os.listdir(root)) == ["safepoint-log.jsonl", "step-00000001"]


def test_cleanup_never_removes_a_staging_entry_of_a_save_in_flight(tmp_path: Path) -> None:
    """Two managers of one process on one root: the second one's first-save cleanup
    runs while the first one's background save is still writing."""
    root = tmp_path / "run"
    started, release = threading.Event(), threading.Event()
    slow = safepoint.CheckpointManager(root, name="slow-{step}", async_save=True)
    real = slow.storage.write_file

    def write_file(relpath: str, data: bytes, *, stage: str = "write") -> None:
        if stage == "manifest":
            started.set()
            assert release.wait(30)
        real(relpath, data, stage=stage)

    slow.storage.write_file = write_file  # type: ignore[method-assign]
    slow.save(state(1.0), step=1)
    assert started.wait(30)
    try:
        other = safepoint.CheckpointManager(root, name="other-{step}")
        other.save(state(2.0), step=2)  # its first save cleans up stale entries
    finally:
        release.set()
    slow.close()
    other.close()
    assert [c.name for c in safepoint.CheckpointManager(root).checkpoints()] == [
        "slow-1",
        "other-2",
    ]


def test_cleanup_is_refused_while_a_writer_in_another_process_is_live(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as mgr:
        mgr.save(state(1.0), step=1)
        stale = root / ".sp.tmp-00000000000000cc"
        stale.mkdir()
        (stale / ".safepoint-marker").write_text('{"safepoint": 1, "kind": "stage"}')
        script = textwrap.dedent(
            f"""
            import safepoint
            from safepoint.storage.local import LocalStorage
            try:
                LocalStorage({str(root)!r}).cleanup_stale()
            except safepoint.StorageError as exc:
                print("refused", exc.stage)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        )
        assert out.stdout.split() == ["refused", "lock"]
        assert stale.exists()


def test_trash_cut_short_while_written_or_removed_is_still_recognised(tmp_path: Path) -> None:
    """A kill while the marker was written, or a removal that stopped midway (its
    marker is removed last), leaves an entry the next cleanup still finishes."""
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as mgr:
        mgr.save(state(1.0), step=1)
    torn = root / ".trash-sp-00000000000000dd"
    torn.mkdir()
    (torn / ".safepoint-marker").write_bytes(b"")  # killed before its first byte
    half = root / ".trash-sp-00000000000000ee"
    (half / "entry").mkdir(parents=True)
    (half / "entry" / "model-00000.safetensors").write_bytes(b"x")
    (half / ".safepoint-marker").write_text('{"safepoint": 1, "kind": "remove", "name": "a"}')
    assert sorted(LocalStorage(root).cleanup_stale()) == [torn.name, half.name]
    assert sorted(os.listdir(root)) == ["safepoint-log.jsonl", "step-00000001"]
