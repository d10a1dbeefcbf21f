"""SIGKILL of an S3 writer mid-save or mid-retention: every listed checkpoint is whole."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

import pytest

s3 = pytest.importorskip("safepoint.storage.s3")
sys.path.insert(0, os.path.dirname(__file__))
from lease_wait import kill_round, successor  # noqa: E402

WRITER = os.path.join(os.path.dirname(__file__), "s3_kill_writer.py")


@pytest.mark.e2e
def test_killed_writers_leave_only_whole_checkpoints(s3_server, s3_root):
    rng = random.Random(12)
    first, kills, committed = 0, 0, set()
    for _ in range(4):
        kill_round(WRITER, s3_root, s3_server.options, first, rng, (0.05, 0.8))
        kills += 1
        storage = successor(s3_root, s3_server.options)
        names = storage.list_names()
        for name in names:  # every listed checkpoint restores exactly
            record = json.loads(storage.read_bytes(f"{name}/manifest.json", max_size=1 << 10))
            data = storage.read_bytes(f"{name}/model.bin", max_size=64 << 20)
            assert (len(data), hashlib.sha256(data).hexdigest()) == (
                record["size"],
                record["sha256"],
            ), name
        committed |= set(names)
        storage.cleanup_stale()  # orphans of the killed save go; referenced payload stays
        referenced = {storage._save_id(n) for n in storage.list_names()}
        on_store = {m["path"].split("/")[1] for m in storage.client.list_all(".sp-data/")}
        assert on_store == referenced
        first = max([int(n.split("-")[1]) for n in names] + [first]) + 1
        storage.unlock()
    assert kills == 4 and committed  # the writer got some saves in
