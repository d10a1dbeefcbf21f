"""Family 5: power loss, modelled by a storage layer that forgets whatever was not fsynced.

:class:`PowerLossStorage` is a :class:`~safepoint.storage.local.LocalStorage` whose *durable
image* changes only through ``fsync``: fsyncing a file makes its current bytes durable,
fsyncing a directory makes its current entries durable (names -> inodes, so renames
are followed). Nothing else is: not a write, not a create, not a rename, not an unlink.
:meth:`PowerLossStorage.power_loss` rebuilds the root from that image, which drops
unsynced bytes (never-synced files come back empty), undoes entries and renames not
followed by an fsync of their directory, and resurrects unlinks not followed by one
(RocksDB's FaultInjectionTestFS idea). Only this catches a missing fsync: remove the
root's fsync after the commit rename and ``test_returned_save_survives_power_loss``
fails.

Power is cut at every crash point of a save (before each storage stage and before each
fsync), then the oracle checks "nothing lost" on the rebuilt root.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from faultkit import MiB, Oracle, digest, expected_digest, leftovers, make_state, metrics_for

import safepoint
from powerloss import PowerCut, PowerLossStorage

SEED = 21
NBYTES = MiB // 2


@pytest.fixture
def committed(tmp_path) -> Path:
    """A root with steps 1 and 2 committed (and durable)."""
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    for step in (1, 2):
        mgr.save(make_state(SEED, step, NBYTES), step=step, metrics=metrics_for(step))
    mgr.close()
    return root


def _save(storage: PowerLossStorage, step: int, keep: safepoint.Keep | None = None) -> None:
    mgr = safepoint.CheckpointManager(storage, keep=keep, monitor="loss" if keep else None)
    try:
        mgr.save(make_state(SEED, step, NBYTES), step=step, metrics=metrics_for(step))
    finally:
        storage.unlock()


def test_returned_save_survives_power_loss(committed, monkeypatch):
    """A save that returned is durable: power loss right after it keeps it latest."""
    storage = PowerLossStorage(committed, monkeypatch)
    _save(storage, 3)
    assert "fsync" in storage.points and "rename" in storage.points
    storage.power_loss()
    monkeypatch.undo()
    Oracle(SEED, NBYTES, returned=3).check(committed)


@pytest.mark.parametrize("keep", [None, safepoint.Keep(last=1)], ids=["no-retention", "keep-1"])
def test_power_cut_at_every_crash_point(committed, tmp_path, monkeypatch, keep):
    template = tmp_path / "template"
    shutil.copytree(committed, template)
    probe = PowerLossStorage(committed, monkeypatch)
    _save(probe, 3, keep)
    monkeypatch.undo()
    points = list(probe.points)
    outcomes: dict[str, int] = {}
    for k in range(1, len(points) + 1):
        shutil.rmtree(committed)
        shutil.copytree(template, committed)
        storage = PowerLossStorage(committed, monkeypatch, cut_at=k)
        with pytest.raises(PowerCut):
            _save(storage, 3, keep)
        storage.power_loss()
        monkeypatch.undo()
        oracle = Oracle(SEED, NBYTES, keep_last=1 if keep else None, returned=2, in_flight=3)
        latest = oracle.check(committed)
        outcomes[f"latest={latest}"] = outcomes.get(f"latest={latest}", 0) + 1
        # The next writer cleans up what the outage left and saves.
        mgr = safepoint.CheckpointManager(committed, keep=keep, monitor="loss" if keep else None)
        mgr.save(make_state(SEED, 4, NBYTES), step=4, metrics=metrics_for(4))
        mgr.close()
        assert leftovers(committed) == []
        got = safepoint.CheckpointManager(committed).restore()
        assert got.step == 4 and digest(got.state) == expected_digest(SEED, 4, NBYTES)
    print(f"\npower cut at {len(points)} crash points {points}: {outcomes}")
    assert len(points) >= 8


def test_unsynced_file_comes_back_empty(tmp_path, monkeypatch):
    """The layer itself: bytes without fsync and entries without a dir fsync are dropped."""
    root = tmp_path / "r"
    root.mkdir()
    (root / "old").write_bytes(b"durable")
    storage = PowerLossStorage(root, monkeypatch)
    (root / "old").write_bytes(b"changed, never synced")
    fd = os.open(root / "synced", os.O_CREAT | os.O_WRONLY)
    os.write(fd, b"data")
    os.fsync(fd)
    os.close(fd)
    (root / "unsynced").write_bytes(b"x")
    storage.power_loss()
    assert sorted(os.listdir(root)) == ["old"]  # "synced" was never in a synced directory
    assert (root / "old").read_bytes() == b"durable"
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    storage.dead = False
    (root / "synced").write_bytes(b"data")
    fd = os.open(root / "synced", os.O_WRONLY)
    os.fsync(fd)
    os.close(fd)
    os.fsync(dfd)
    os.close(dfd)
    storage.power_loss()
    assert (root / "synced").read_bytes() == b"data"
