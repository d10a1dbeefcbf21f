"""The manager on a bucket: saves, retention, the run log, restore and verify."""

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


def test_an_s3_url_root_round_trips_every_kind_of_leaf_bit_exact(s3_server, s3_root):
    rng = np.random.default_rng(7)
    state = {
        "f32": rng.standard_normal((300, 17)).astype(np.float32),
        "i64": rng.integers(-(2**62), 2**62, size=33, dtype=np.int64),
        "u8": rng.integers(0, 255, size=40_000, dtype=np.uint8),
        "empty": np.zeros((0, 4), dtype=np.float16),
        "meta": {"text": "ünï $x", "huge": 2**70, "nan": float("nan")},
    }
    mgr = safepoint.CheckpointManager(
        s3_root,
        storage_options=s3_server.options,
        monitor="loss",
        keep=safepoint.Keep(last=1, best=1),
    )
    mgr.save(state, step=1, metrics={"loss": 0.1})
    mgr.save({**state, "u8": state["u8"][::-1].copy()}, step=2, metrics={"loss": 0.5})
    assert [c.step for c in mgr.checkpoints()] == [1, 2]  # the best and the newest
    assert all(v.ok for v in mgr.verify())
    best = mgr.restore(checkpoint="best")
    latest = mgr.restore()
    mgr.close()
    assert best is not None and latest is not None and latest.step == 2
    for key in ("f32", "i64", "u8", "empty"):
        got = best.state[key]
        assert got.dtype == state[key].dtype and got.tobytes() == state[key].tobytes(), key
    assert latest.state["u8"].tobytes() == state["u8"][::-1].tobytes()
    assert best.state["meta"]["huge"] == 2**70 and best.state["meta"]["text"] == "ünï $x"


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
