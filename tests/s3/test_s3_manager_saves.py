"""The manager accepts an S3Storage as its root: saves, retention and the run log on a bucket.

(Restoring needs the formats to stop calling ``fileno()``: issue 11's storage seam.)
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import safepoint
from safepoint.errors import StorageError

s3 = pytest.importorskip("safepoint.storage.s3")


def test_saves_and_retention_through_the_manager(s3_server, s3_root):
    storage = s3.open_root(s3_root, s3_server.options)
    mgr = safepoint.CheckpointManager(storage, keep=safepoint.Keep(last=2))
    state = {"w": np.arange(1000, dtype=np.float32), "step": 3}
    for step in range(1, 5):
        mgr.save(state, step=step)
    assert [c.step for c in mgr.checkpoints()] == [3, 4]
    keys = sorted(m["path"] for m in storage.client.list_all(""))
    records = [k for k in keys if not k.startswith(".")]
    assert records == ["step-00000003/manifest.json", "step-00000004/manifest.json"]
    assert ".sp-lease.json" in keys  # held while the manager is open
    assert len({k.split("/")[1] for k in keys if k.startswith(".sp-data/")}) == 2
    events = [json.loads(line) for line in storage.read_log().splitlines()]
    assert [e["step"] for e in events if e["event"] == "save"] == [1, 2, 3, 4]
    mgr.close()
    assert ".sp-lease.json" not in {m["path"] for m in storage.client.list_all("")}  # released


def test_network_errors_are_retried_with_a_bound_then_reported(s3_server, s3_root, monkeypatch):
    from safepoint.storage.s3 import config as s3_config

    monkeypatch.setattr(s3_config, "MAX_RETRIES", 2)
    storage = s3.S3Storage(s3_root, s3_server.options)
    staged = storage.stage("step-1")
    dead = {**s3_server.options, "endpoint": "http://127.0.0.1:9"}
    storage.client.store = s3_config.make_store(storage.location, dead)
    started = time.monotonic()
    with pytest.raises(StorageError, match="after 2 retries") as info:
        storage.write_file(f"{staged}/a.bin", b"x")
    assert time.monotonic() - started < 10
    assert info.value.stage == "write"
