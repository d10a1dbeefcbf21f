"""The S3 server killed (SIGKILL) in the middle of a save's upload, then restarted."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import safepoint
from safepoint.errors import StorageError

pytest.importorskip("safepoint.storage.s3")


def test_a_server_killed_mid_upload_fails_the_save_and_the_next_one_works(private_s3):
    root = "s3://safepoint-tests/crash"
    options = private_s3.server.options
    mgr = safepoint.CheckpointManager(root, storage_options=options)
    small = {"w": np.arange(1000, dtype=np.float32)}
    mgr.save(small, step=1)
    big = {"w": np.random.default_rng(0).standard_normal(48 << 20).astype(np.float32)}  # 192 MiB
    outcome: dict[str, object] = {}

    def save() -> None:
        began = time.monotonic()
        try:
            mgr.save(big, step=2)
            outcome["saved"] = True
        except StorageError as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - began

    thread = threading.Thread(target=save)
    thread.start()
    time.sleep(0.3)  # the first multipart parts are on their way
    private_s3.kill()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the save hung on a dead server"
    assert "saved" not in outcome, "the upload finished before the kill: make the state larger"
    error = outcome["error"]
    assert isinstance(error, StorageError), error
    assert outcome["seconds"] < 90  # retried with backoff, then reported: a bound, no hang
    private_s3.start()  # same ports, same data directory
    assert [c.step for c in mgr.checkpoints()] == [1]  # nothing partial is listed
    mgr.save({"w": small["w"] + 1}, step=3)
    assert [c.step for c in mgr.checkpoints()] == [1, 3]
    back = mgr.restore()
    assert back is not None and back.state["w"].tobytes() == (small["w"] + 1).tobytes()
    mgr.close()
    assert (
        safepoint.load(f"{root}/{mgr.checkpoints()[0].name}", storage_options=options)[
            "w"
        ].tobytes()
        == small["w"].tobytes()
    )
