"""Async saves into a bucket: the training thread only copies; the upload, checksums and
conditional commit run in the background, and errors surface at the next call."""

from __future__ import annotations

import numpy as np
import pytest

import safepoint
from safepoint.errors import StorageError

pytest.importorskip("safepoint.storage.s3")


def test_async_saves_commit_in_order_and_restore_exactly(s3_server, s3_root):
    mgr = safepoint.CheckpointManager(
        s3_root, storage_options=s3_server.options, async_save=True, keep=safepoint.Keep(last=2)
    )
    w = np.zeros(3 << 20, dtype=np.float32)  # 12 MiB
    for step in range(1, 5):
        w[:] = step
        mgr.save({"w": w, "step": step}, step=step)
        w[:] = -1  # the staged copy, not the live array, is uploaded
    mgr.wait()
    assert [c.step for c in mgr.checkpoints()] == [3, 4]
    back = mgr.restore()
    assert back is not None and back.state["step"] == 4
    assert np.all(back.state["w"] == 4)
    mgr.close()


def test_a_failed_background_upload_is_reported_and_nothing_is_listed(s3_server, s3_root):
    mgr = safepoint.CheckpointManager(s3_root, storage_options=s3_server.options, async_save=True)
    mgr.save({"w": np.arange(10.0)}, step=1)
    mgr.wait()
    storage = mgr.storage

    def refuse(stage: str, target: str) -> None:
        if stage == "write":
            raise StorageError("injected: the upload failed", stage="write")

    storage._fault = refuse  # the backend's fault-injection seam
    mgr.save({"w": np.arange(10.0) + 1}, step=2)
    with pytest.raises(StorageError, match="injected"):
        mgr.wait()
    storage._fault = lambda stage, target: None
    assert [c.step for c in mgr.checkpoints()] == [1]
    mgr.save({"w": np.arange(10.0) + 3}, step=3)
    mgr.wait()
    assert [c.step for c in mgr.checkpoints()] == [1, 3]
    mgr.close()
