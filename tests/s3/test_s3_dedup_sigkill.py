"""SIGKILL of a dedup CheckpointManager on a bucket, at random points of its saves,
retention passes and blob collections (issue 15): every listed checkpoint restores
exactly, no blob a record references is ever missing, and a cleanup then leaves
exactly the referenced blobs and payload."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest

import safepoint

torch = pytest.importorskip("torch")
s3 = pytest.importorskip("safepoint.storage.s3")
HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from lease_wait import kill_round, successor  # noqa: E402
from s3_dedup_kill_manager import Run  # noqa: E402

WRITER = os.path.join(HERE, "s3_dedup_kill_manager.py")
KILLS = 8


def _check(storage: s3.S3Storage, want: Run) -> list[int]:
    mgr = safepoint.CheckpointManager(storage)
    listed = mgr.checkpoints()
    for ckpt in listed:
        got = mgr.restore(checkpoint=ckpt.name)
        assert got is not None
        expect = want.state(ckpt.step)
        for key in ("frozen", "ema", "head"):
            assert torch.equal(torch.as_tensor(got.state[key]), expect[key]), (ckpt.name, key)
        assert np.array_equal(got.state["other"], expect["other"])
        assert got.state["step"] == ckpt.step
    return [c.step for c in listed]


@pytest.mark.e2e
def test_killed_dedup_managers_never_lose_a_referenced_blob(s3_server, s3_root):
    rng = random.Random(15)
    want = Run()
    first, reported = 1, []
    for round_ in range(KILLS):
        reported += kill_round(WRITER, s3_root, s3_server.options, first, rng, (0.1, 1.5))
        storage = successor(s3_root, s3_server.options)
        try:
            steps = _check(storage, want)
            if reported:
                assert max(steps) >= reported[-1], (steps, reported[-1])
            storage.cleanup_stale()  # no grace: the killed save's payload goes
            storage.blob_store().collect(grace_s=0)  # and its blobs
            names = storage.list_names()
            referenced = {k for n in names for k in storage.record_refs(n).values()}
            blobs = {m["path"].split("/")[1] for m in storage.client.list_all(".sp-blobs/")}
            assert blobs == referenced, round_
            ids = {storage._save_id(n) for n in names}
            data = {m["path"].split("/")[1] for m in storage.client.list_all(".sp-data/")}
            assert data <= ids, round_  # a save of only blobs has no payload of its own
            assert _check(storage, want) == steps  # the cleanup took nothing referenced
        finally:
            storage.unlock()
        first = max([first, *steps]) + 1
    assert len(reported) >= KILLS // 2, reported  # the writers got real work done
