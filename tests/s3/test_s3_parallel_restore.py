"""A restore from a bucket reads each large payload object with ranged GETs in parallel,
verifies it, and names an object that is shorter than its manifest says."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import safepoint
from safepoint.storage import payload_read
from safepoint.storage.s3.client import S3Client
from safepoint.storage.s3.io import RangeFile

s3 = pytest.importorskip("safepoint.storage.s3")


def test_a_large_payload_is_read_with_several_ranges_in_flight(s3_server, s3_root, monkeypatch):
    state = {"w": np.random.default_rng(1).standard_normal(20 << 20).astype(np.float32)}  # 80 MiB
    mgr = safepoint.CheckpointManager(s3_root, storage_options=s3_server.options)
    mgr.save(state, step=1)
    real = S3Client.get_range_into
    lock = threading.Lock()
    active, peak, calls = [0], [0], []

    def counting(self, relkey, start, view):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            calls.append((start, view.nbytes))
        try:
            time.sleep(0.02)  # keep each request open long enough to overlap
            return real(self, relkey, start, view)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(S3Client, "get_range_into", counting)
    back = mgr.restore()
    mgr.close()
    assert back is not None and back.state["w"].tobytes() == state["w"].tobytes()
    assert len(calls) >= 5  # 80 MiB in 16 MiB ranges
    assert 1 < peak[0] <= payload_read.RANGE_THREADS


def test_an_object_shorter_than_its_range_is_an_error_not_garbage(s3_server, s3_root):
    storage = s3.open_root(s3_root, s3_server.options)
    storage.client.put("obj", b"x" * 100, stage="test")
    view = memoryview(bytearray(50))
    reader = RangeFile(storage.client, "obj", 200)  # a size the object does not have
    with pytest.raises(EOFError):
        reader.read_range_into(view[:50], 80)  # only 20 bytes are there
    with pytest.raises(EOFError):
        reader.read_range_into(view, 190)  # outside the size the reader was given
