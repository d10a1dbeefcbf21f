"""Power loss during ASYNC dedup saves (issue 15: dedup "works with sync and async saves").

The proof of ``test_dedup_power_loss.py`` for ``CheckpointManager(root, dedup=True,
async_save=True)``: power is cut at every crash point (each storage stage, each
fsync, in the background worker or the blob writers) of three async saves of one
manager with retention on, saves that meet every verdict of the dedup plan (a new
blob, a blob already stored, a hinted link, a tensor predicted changed, an in-place
EMA equal to a blob). Right after each ``save()`` returns, training overwrites the
state's tensors in place while the save is still being written: that must never
change what is saved, nor mislead the next save's hints.

After each outage every listed checkpoint restores bit-exactly and verifies, the
newest is the last save known committed (waited for: by the next ``save()`` or by
``wait()``) or the one in flight, ``safepoint gc --grace 0`` frees nothing a checkpoint
references, and the next async saves work.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from dedup_powerloss_state import KEEP, Outage, Training, check, committed, cut_at_every_point

import safepoint
from powerloss import PowerCut, PowerLossStorage
from safepoint.catalog.dedup import HASH, OWN, BlobRef, Verdict
from safepoint.manager.dedup import Hints
from safepoint.ondisk.names import BLOBS
from safepoint.state.tree import TensorLeaf

STEPS = [3, 4, 5]


def _saves(storage: PowerLossStorage, waited: list[int]) -> None:
    """Save ``STEPS`` in the background with one manager, scribbling over the state
    right after each ``save()`` returns; note each step known committed."""
    run = Training()
    mgr = safepoint.CheckpointManager(
        storage, dedup=True, async_save=True, keep=KEEP, run_log=False
    )
    in_flight: int | None = None
    try:
        for step in STEPS:
            mgr.save(run.state(step), step=step)  # first waits for the one in flight
            if in_flight is not None:
                waited.append(in_flight)
            in_flight = step
            run.scribble(step)  # while the save is written
        mgr.wait()
        waited.append(STEPS[-1])
    finally:
        with contextlib.suppress(PowerCut):
            mgr.wait()  # nothing writes into the root while the power is out
        storage.unlock()


def test_waited_async_dedup_saves_survive_power_loss(tmp_path: Path, monkeypatch) -> None:
    """With no cut: the saves meet every verdict, and all three survive the outage."""
    root = tmp_path / "run"
    committed(root)
    verdicts: list[dict[str, object]] = []
    plan = Hints.plan

    def noting(hints: Hints, leaf: TensorLeaf) -> Verdict:
        verdict = plan(hints, leaf)
        if leaf.key == "frozen":  # the first leaf of a save
            verdicts.append({})
        verdicts[-1][leaf.key] = "link" if isinstance(verdict, BlobRef) else verdict
        return verdict

    monkeypatch.setattr(Hints, "plan", noting)
    stored = set(os.listdir(root / BLOBS))
    storage = Outage(root, monkeypatch)
    waited: list[int] = []
    _saves(storage, waited)
    assert waited == STEPS
    # 3 (new manager): every tensor hashed; live (3) and other (0) become new blobs,
    # frozen and ema link the stored one. 4 and 5: frozen a hinted link, ema (in place,
    # equal bytes) hashed and linked, live predicted changed, other (numpy: 1, 2) predicted
    # changed by its fingerprint.
    later = {"frozen": "link", "ema": HASH, "live": OWN, "other": OWN}
    assert verdicts == [dict.fromkeys(later), later, later]
    assert len(set(os.listdir(root / BLOBS)) - stored) == 2
    assert {"fsync", "dir-fsync", "rename", "retention"} <= set(storage.points)
    storage.power_loss()
    monkeypatch.undo()
    assert check(root, returned=5, in_flight=None) == 5


@pytest.mark.heavy  # ~60 outages, each followed by a gc and two async saves
def test_power_cut_at_every_crash_point_of_async_dedup_saves(tmp_path, monkeypatch) -> None:
    points = cut_at_every_point(tmp_path, monkeypatch, _saves, async_save=True)
    assert len(points) >= 3 * 8
