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
from typing import Any

import numpy as np
import pytest

import safepoint
from powerloss import PowerCut, PowerLossStorage
from safepoint.cli.commands import main as cli
from safepoint.ondisk.names import BLOBS

torch = pytest.importorskip("torch")

N = 4096


class Training:
    """The state of a small fine-tuning run, a pure function of its step.

    ``frozen`` never changes (a hinted link after the first save), ``ema`` equals it
    and is updated in place (a changed version, equal bytes), ``live`` changes in place
    every step (predicted changed after two saves), ``other`` is numpy (always hashed)
    and repeats every 3 steps (a blob an older checkpoint already stored).
    """

    def __init__(self) -> None:
        self.frozen = torch.arange(N, dtype=torch.float32)
        self.ema = self.frozen.clone()
        self.live = torch.zeros(N // 4)

    def state(self, step: int) -> dict[str, Any]:
        self.live.fill_(float(step))
        self.ema.mul_(1.0)
        return {
            "frozen": self.frozen,
            "ema": self.ema,
            "live": self.live,
            "other": np.full(N // 8, step % 3, dtype=np.int32),
        }


def _expected(step: int) -> dict[str, np.ndarray]:
    return {
        "frozen": np.arange(N, dtype=np.float32),
        "ema": np.arange(N, dtype=np.float32),
        "live": np.full(N // 4, step, dtype=np.float32),
        "other": np.full(N // 8, step % 3, dtype=np.int32),
    }


KEEP = safepoint.Keep(last=2)


def _committed(root: Path) -> None:
    """Steps 1 and 2, durable."""
    run = Training()
    with safepoint.CheckpointManager(root, dedup=True, keep=KEEP, run_log=False) as mgr:
        for step in (1, 2):
            mgr.save(run.state(step), step=step)


def _check(root: Path, *, returned: int, in_flight: int | None) -> int:
    """Every listed checkpoint is whole; the newest is ``returned`` or ``in_flight``."""
    listed = safepoint.CheckpointManager(root).checkpoints()
    steps = [int(c.step) for c in listed]
    assert steps, "nothing listed after the outage"
    for ckpt in listed:
        got = safepoint.load(root / ckpt.name, as_numpy=True)
        for key, want in _expected(int(ckpt.step)).items():
            assert got[key].dtype == want.dtype and np.array_equal(got[key], want), ckpt.name
    with safepoint.CheckpointManager(root) as mgr:
        assert [v.error for v in mgr.verify()] == [None] * len(listed)
    latest = max(steps)
    assert latest in {returned, in_flight}, (steps, returned, in_flight)
    assert latest - 1 in steps  # retention (keep 2) never took the one before the newest
    return latest


def _saves(storage: PowerLossStorage, steps: list[int], returned: list[int]) -> None:
    """Save ``steps`` with one manager, noting each step whose save returned."""
    run = Training()
    mgr = safepoint.CheckpointManager(storage, dedup=True, keep=KEEP, run_log=False)
    try:
        for step in steps:
            mgr.save(run.state(step), step=step)
            returned.append(step)
    finally:
        storage.unlock()


def _after_outage(root: Path, *, returned: int, in_flight: int | None) -> None:
    _check(root, returned=returned, in_flight=in_flight)
    assert cli(["gc", str(root), "--grace", "0"]) == 0  # frees nothing referenced
    latest = _check(root, returned=returned, in_flight=in_flight)
    assert not [n for n in os.listdir(root / BLOBS) if n.startswith(".tmp-")]
    run = Training()  # the next run saves again (fresh hints), then gc again
    with safepoint.CheckpointManager(root, dedup=True, keep=KEEP, run_log=False) as mgr:
        mgr.save(run.state(latest + 1), step=latest + 1)
        mgr.save(run.state(latest + 2), step=latest + 2)
    assert cli(["gc", str(root), "--grace", "0"]) == 0
    _check(root, returned=latest + 2, in_flight=None)


STEPS = [3, 4, 5]


def test_returned_dedup_saves_survive_power_loss(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "run"
    _committed(root)
    storage = PowerLossStorage(root, monkeypatch)
    returned: list[int] = []
    _saves(storage, STEPS, returned)
    assert returned == STEPS
    assert {"fsync", "dir-fsync", "rename", "retention"} <= set(storage.points)
    storage.power_loss()
    monkeypatch.undo()
    assert _check(root, returned=5, in_flight=None) == 5


@pytest.mark.heavy  # ~60 outages, each followed by a gc and two saves: ~12 s
def test_power_cut_at_every_crash_point_of_dedup_saves(tmp_path: Path, monkeypatch) -> None:
    root, template = tmp_path / "run", tmp_path / "template"
    _committed(template)
    probe_root = tmp_path / "probe"
    shutil.copytree(template, probe_root)
    probe = PowerLossStorage(probe_root, monkeypatch)
    _saves(probe, STEPS, [])
    monkeypatch.undo()
    points = len(probe.points)
    assert points >= 3 * 8
    for k in range(1, points + 1):
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(template, root)
        storage = PowerLossStorage(root, monkeypatch, cut_at=k)
        returned = [2]
        with pytest.raises(PowerCut):
            _saves(storage, STEPS, returned)
        storage.power_loss()
        monkeypatch.undo()
        _after_outage(root, returned=returned[-1], in_flight=returned[-1] + 1)


def test_power_cut_at_every_crash_point_of_gc(tmp_path: Path, monkeypatch) -> None:
    root, template = tmp_path / "run", tmp_path / "template"
    run = Training()
    with safepoint.CheckpointManager(template, dedup=True, keep=KEEP, run_log=False) as mgr:
        for step in range(1, 7):  # retention leaves the blobs of steps 1-4 unreferenced
            mgr.save(run.state(step), step=step)
    shutil.copytree(template, root)
    probe = PowerLossStorage(root, monkeypatch)
    assert cli(["gc", str(root), "--grace", "0"]) == 0
    monkeypatch.undo()
    assert probe.points  # gc makes its unlinks durable
    for k in range(1, len(probe.points) + 1):
        shutil.rmtree(root)
        shutil.copytree(template, root)
        storage = PowerLossStorage(root, monkeypatch, cut_at=k)
        with pytest.raises(PowerCut):
            cli(["gc", str(root), "--grace", "0"])
        storage.power_loss()
        monkeypatch.undo()
        _after_outage(root, returned=6, in_flight=None)


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
