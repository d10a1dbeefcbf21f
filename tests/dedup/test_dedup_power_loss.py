"""Power loss during dedup saves, retention and gc (issue 15, RELIABILITY.md family 5).

:class:`PowerLossStorage` is the power-loss layer of ``tests/reliability/test_f05_power_loss.py``
(a root whose durable image changes only through ``fsync``: unsynced bytes are dropped,
entries not followed by a directory fsync undone, unlinks resurrected), made aware of
hard links: names of one inode come back as links of one file, so a blob's link count
after the outage is what the durable directories say, and ``safepoint gc`` (which frees
blobs whose only name is the store's) sees what it would see on a rebooted machine.

Power is cut at every crash point (each storage stage, each fsync) of three saves of
one manager -- so every verdict of the plan is met: a new blob, a blob already stored,
a hinted link, a tensor predicted changed, an in-place EMA equal to a blob -- with
retention on, and at every crash point of a ``safepoint gc``. After each outage every
listed checkpoint restores bit-exactly and verifies, the newest is the last returned
save or the one in flight, ``safepoint gc`` frees nothing a checkpoint references, and
the next save works.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from dedup_powerloss_state import (
    KEEP,
    Training,
    after_outage,
    check,
    committed,
    copy_root,
    cut_at_every_point,
)

import safepoint
from powerloss import PowerCut, PowerLossStorage
from safepoint.cli.commands import main as cli

STEPS = [3, 4, 5]


def _saves(storage: PowerLossStorage, returned: list[int]) -> None:
    """Save ``STEPS`` with one manager, noting each step whose save returned."""
    run = Training()
    mgr = safepoint.CheckpointManager(storage, dedup=True, keep=KEEP, run_log=False)
    try:
        for step in STEPS:
            mgr.save(run.state(step), step=step)
            returned.append(step)
    finally:
        storage.unlock()


def test_returned_dedup_saves_survive_power_loss(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "run"
    committed(root)
    storage = PowerLossStorage(root, monkeypatch)
    returned: list[int] = []
    _saves(storage, returned)
    assert returned == STEPS
    assert {"fsync", "dir-fsync", "rename", "retention"} <= set(storage.points)
    storage.power_loss()
    monkeypatch.undo()
    assert check(root, returned=5, in_flight=None) == 5


@pytest.mark.heavy  # ~60 outages, each followed by a gc and two saves: ~12 s
def test_power_cut_at_every_crash_point_of_dedup_saves(tmp_path: Path, monkeypatch) -> None:
    points = cut_at_every_point(tmp_path, monkeypatch, _saves, async_save=False)
    assert len(points) >= 3 * 8


def test_power_cut_at_every_crash_point_of_gc(tmp_path: Path, monkeypatch) -> None:
    root, template = tmp_path / "run", tmp_path / "template"
    run = Training()
    with safepoint.CheckpointManager(template, dedup=True, keep=KEEP, run_log=False) as mgr:
        for step in range(1, 7):  # retention leaves the blobs of steps 1-4 unreferenced
            mgr.save(run.state(step), step=step)
    copy_root(template, root)
    probe = PowerLossStorage(root, monkeypatch)
    assert cli(["gc", str(root), "--grace", "0"]) == 0
    monkeypatch.undo()
    assert probe.points  # gc makes its unlinks durable
    for k in range(1, len(probe.points) + 1):
        shutil.rmtree(root)
        copy_root(template, root)
        storage = PowerLossStorage(root, monkeypatch, cut_at=k)
        with pytest.raises(PowerCut):
            cli(["gc", str(root), "--grace", "0"])
        storage.power_loss()
        monkeypatch.undo()
        after_outage(root, returned=6, in_flight=None, async_save=False)


def test_the_layer_keeps_hard_links(tmp_path: Path, monkeypatch) -> None:
    """Names of one inode come back as links, unsynced names and bytes do not."""
    root = tmp_path / "r"
    root.mkdir()
    (root / "a").write_bytes(b"durable")
    os.link(root / "a", root / "b")
    storage = PowerLossStorage(root, monkeypatch)
    os.link(root / "a", root / "c")  # never made durable by a directory fsync
    storage.power_loss()
    assert sorted(os.listdir(root)) == ["a", "b"]
    assert (root / "b").read_bytes() == b"durable" and (root / "a").stat().st_nlink == 2
