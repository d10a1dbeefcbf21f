"""Stale multipart uploads (a writer killed mid-upload) are aborted by ``safepoint gc``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

s3 = pytest.importorskip("safepoint.storage.s3")
pytest.importorskip("botocore")
from safepoint.storage.s3 import uploads  # noqa: E402

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
WRITER = """
import json, sys
import numpy as np
import safepoint
mgr = safepoint.CheckpointManager(sys.argv[1], storage_options=json.loads(sys.argv[2]))
print("ready", flush=True)
mgr.save({"w": np.ones(96 << 18, dtype=np.float32)}, step=1)  # 96 MiB: a multipart upload
print("saved", flush=True)
"""


def _open_uploads(client, bucket: str, prefix: str) -> list[str]:
    page = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [u["Key"] for u in page.get("Uploads", [])]


def test_an_upload_left_by_a_killed_writer_is_aborted_once_stale(s3_server, s3_root):
    storage = s3.S3Storage(s3_root, s3_server.options, stale_after=3600.0)
    client = uploads._client(storage.client.config)
    prefix = storage.client.location.key(".sp-data/")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, s3_root, json.dumps(s3_server.options)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 60
        while not _open_uploads(client, s3_server.bucket, prefix):  # its upload has begun
            assert time.monotonic() < deadline, "the writer never started a multipart upload"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    left = _open_uploads(client, s3_server.bucket, prefix)
    assert len(left) == 1
    # The killed writer died on this machine: its lease is taken over at once.
    assert storage.abort_stale_uploads() == []  # younger than the grace period: kept
    assert _open_uploads(client, s3_server.bucket, prefix) == left
    storage.stale_after = -1.0
    assert storage.abort_stale_uploads() == [f"multipart upload {left[0]}"]
    assert _open_uploads(client, s3_server.bucket, prefix) == []
    client.close()


def test_an_upload_of_a_save_in_flight_here_is_spared(s3_server, s3_root):
    storage = s3.S3Storage(s3_root, s3_server.options, stale_after=-1.0)
    storage.lock()
    try:
        staged = storage.stage("step-1")
        writer = storage.open_write(f"{staged}/big.bin")
        writer.write([memoryview(b"x" * (40 << 20))])  # parts in flight, not completed
        client = uploads._client(storage.client.config)
        prefix = storage.client.location.key(".sp-data/")
        assert storage.abort_stale_uploads() == []
        assert len(_open_uploads(client, s3_server.bucket, prefix)) == 1
        writer.close()
        storage.discard(staged)
        client.close()
    finally:
        storage.unlock()


def test_safepoint_gc_aborts_stale_uploads(s3_env, s3_root, capsys):
    from safepoint.cli import main

    storage = s3.S3Storage(s3_root, s3_env.options)
    storage.lock()
    staged = storage.stage("step-1")
    writer = storage.open_write(f"{staged}/big.bin")
    writer.write([memoryview(b"x" * (40 << 20))])  # a multipart upload, never completed
    s3.writers.LIVE.difference_update(storage._staged)  # as if this writer had been killed
    storage._staged.clear()
    storage.unlock()
    assert main(["gc", s3_root]) == 0  # the default grace keeps the young upload
    assert "removed multipart upload" not in capsys.readouterr().out
    assert main(["gc", s3_root, "--grace", "-1"]) == 2  # refused: no negative grace
    assert main(["gc", s3_root, "--grace", "nan"]) == 2
    time.sleep(1.1)  # the server's clock stamps whole seconds
    assert main(["gc", s3_root, "--grace", "0"]) == 0
    assert "removed multipart upload" in capsys.readouterr().out
    client = uploads._client(storage.client.config)
    assert _open_uploads(client, s3_env.bucket, storage.client.location.key(".sp-data/")) == []
    client.close()
