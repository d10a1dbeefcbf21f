"""What the dedup power-loss tests share (sync: test_dedup_power_loss.py, async:
test_dedup_power_loss_async.py): the training run whose saves meet every verdict of
the dedup plan, the checks after an outage, and the loop that cuts the power at every
crash point of a series of saves.

The roots are copied with their hard links kept (:func:`copy_root`): a checkpoint of
the template shares its blobs' inodes, as on the machine that wrote it, so retention
and ``safepoint gc`` after an outage meet blobs that older checkpoints still link.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
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
KEEP = safepoint.Keep(last=2)


class Training:
    """The state of a small fine-tuning run, a pure function of its step.

    ``frozen`` never changes (a hinted link after the first save), ``ema`` equals it
    and is updated in place (a changed version, equal bytes), ``live`` changes in place
    every step (predicted changed after two saves), ``other`` is numpy (hashed by a
    manager's first save, then predicted by its fingerprint) and repeats every 3 steps
    (a blob an older checkpoint already stored, found by a hashing save).
    """

    def __init__(self) -> None:
        self.frozen = torch.arange(N, dtype=torch.float32)
        self.ema = self.frozen.clone()
        self.live = torch.zeros(N // 4)
        self._trained = 0

    def _train(self, step: int) -> None:
        """Bring ``live`` to ``step``, in place, once."""
        if self._trained != step:
            self.live.fill_(float(step))
            self._trained = step

    def state(self, step: int) -> dict[str, Any]:
        self._train(step)
        self.ema.copy_(self.frozen)
        return {
            "frozen": self.frozen,
            "ema": self.ema,
            "live": self.live,
            "other": np.full(N // 8, step % 3, dtype=np.int32),
        }

    def scribble(self, step: int) -> None:
        """Training goes on right after ``save(step)`` returned: ``live`` takes the next
        step's value in place (``state(step + 1)`` finds it done and leaves it alone,
        so its version is the one noted right after the save) and ``ema`` is overwritten
        (``state`` sets it again)."""
        self._train(step + 1)
        self.ema.fill_(-1.0)


def expected(step: int) -> dict[str, np.ndarray]:
    return {
        "frozen": np.arange(N, dtype=np.float32),
        "ema": np.arange(N, dtype=np.float32),
        "live": np.full(N // 4, step, dtype=np.float32),
        "other": np.full(N // 8, step % 3, dtype=np.int32),
    }


def committed(root: Path) -> None:
    """Steps 1 and 2, durable."""
    run = Training()
    with safepoint.CheckpointManager(root, dedup=True, keep=KEEP, run_log=False) as mgr:
        for step in (1, 2):
            mgr.save(run.state(step), step=step)


def copy_root(src: Path, dst: Path) -> None:
    """Copy the tree ``src`` to ``dst``, names of one inode as hard links of one file."""
    made: dict[int, str] = {}
    for here, _, filenames in os.walk(src):
        target = os.path.join(dst, os.path.relpath(here, src))
        os.makedirs(target)
        for name in filenames:
            path, copy = os.path.join(here, name), os.path.join(target, name)
            ino = os.lstat(path).st_ino
            if ino in made:
                os.link(made[ino], copy)
            else:
                shutil.copyfile(path, copy)
                made[ino] = copy


#: The power-loss layer (its crash points are counted under a lock: the blob writers and
#: the async save's worker meet them from several threads).
Outage = PowerLossStorage


def check(root: Path, *, returned: int, in_flight: int | None) -> int:
    """Every listed checkpoint is whole; the newest is ``returned`` or ``in_flight``."""
    listed = safepoint.CheckpointManager(root).checkpoints()
    steps = [int(c.step) for c in listed]
    assert steps, "nothing listed after the outage"
    for ckpt in listed:
        got = safepoint.load(root / ckpt.name, as_numpy=True)
        for key, want in expected(int(ckpt.step)).items():
            assert got[key].dtype == want.dtype and np.array_equal(got[key], want), ckpt.name
    with safepoint.CheckpointManager(root) as mgr:
        assert [v.error for v in mgr.verify()] == [None] * len(listed)
    latest = max(steps)
    assert latest in {returned, in_flight}, (steps, returned, in_flight)
    assert latest - 1 in steps  # retention (keep 2) never took the one before the newest
    return latest


def after_outage(root: Path, *, returned: int, in_flight: int | None, async_save: bool) -> None:
    """The checks of :func:`check`, then a ``gc --grace 0`` that frees nothing
    referenced, then two saves of a new run (sync or async) and another gc."""
    check(root, returned=returned, in_flight=in_flight)
    assert cli(["gc", str(root), "--grace", "0"]) == 0  # frees nothing referenced
    latest = check(root, returned=returned, in_flight=in_flight)
    assert not [n for n in os.listdir(root / BLOBS) if n.startswith(".tmp-")]
    run = Training()  # the next run saves again (fresh hints), then gc again
    with safepoint.CheckpointManager(
        root, dedup=True, keep=KEEP, run_log=False, async_save=async_save
    ) as mgr:
        mgr.save(run.state(latest + 1), step=latest + 1)
        mgr.save(run.state(latest + 2), step=latest + 2)
    assert cli(["gc", str(root), "--grace", "0"]) == 0
    check(root, returned=latest + 2, in_flight=None)


#: ``saves(storage, returned)``: save steps 3, 4 and 5 on ``storage``, appending to
#: ``returned`` each step known committed (a returned sync save, a waited async one).
Saves = Callable[[PowerLossStorage, list[int]], None]


def cut_at_every_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saves: Saves, *, async_save: bool
) -> list[str]:
    """Cut the power at each crash point of ``saves`` on a root holding steps 1 and 2,
    and run :func:`after_outage` after each outage; return the crash points met."""
    root, template, probe_root = tmp_path / "run", tmp_path / "template", tmp_path / "probe"
    committed(template)
    copy_root(template, probe_root)
    probe = Outage(probe_root, monkeypatch)
    saves(probe, [])
    monkeypatch.undo()
    for k in range(1, len(probe.points) + 1):
        shutil.rmtree(root, ignore_errors=True)
        copy_root(template, root)
        storage = Outage(root, monkeypatch, cut_at=k)
        returned = [2]
        with pytest.raises(PowerCut):
            saves(storage, returned)
        storage.power_loss()
        monkeypatch.undo()
        last = returned[-1]
        after_outage(root, returned=last, in_flight=last + 1, async_save=async_save)
    return probe.points
