"""``CheckpointManager(s3_root, local_first=DIR)``: saves commit locally, uploads follow."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import safepoint
from safepoint.errors import ConfigError, StorageError

s3 = pytest.importorskip("safepoint.storage.s3")
from safepoint.storage.s3.client import S3Client  # noqa: E402

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from s3_local_first_writer import state_of  # noqa: E402

WRITER = os.path.join(HERE, "s3_local_first_writer.py")
SRC = os.path.abspath(os.path.join(HERE, "..", "..", "src"))


def _hold_uploads(monkeypatch) -> threading.Event:
    """Uploads wait at their start (stage) until the returned event is set."""
    release = threading.Event()
    real_stage = s3.S3Storage.stage

    def held_stage(self, name):
        assert release.wait(30), "the test never released the upload"
        return real_stage(self, name)

    monkeypatch.setattr(s3.S3Storage, "stage", held_stage)
    return release


def _same(got, step: int) -> None:
    want = state_of(step)
    assert got.state["w"].tobytes() == want["w"].tobytes() and got.state["meta"] == want["meta"]


def _bucket_steps(s3_root: str, options) -> list[int]:
    bucket = safepoint.CheckpointManager(s3_root, storage_options=options)
    return [c.step for c in bucket.checkpoints()]


def test_saves_land_locally_then_in_the_bucket_with_retention_on_both(s3_server, s3_root, tmp_path):
    local = tmp_path / "local"
    opts = s3_server.options
    with safepoint.CheckpointManager(
        s3_root, local_first=local, storage_options=opts, keep=safepoint.Keep(last=2)
    ) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(state_of(step), step=step)
        assert [c.step for c in mgr.checkpoints()] == [3, 4]
    assert _bucket_steps(s3_root, opts) == [3, 4]  # close() waited for the uploads
    assert sorted(p.name for p in local.iterdir() if p.is_dir() and p.name[0] != ".") == [
        "step-00000003",
        "step-00000004",
    ]
    bucket = safepoint.CheckpointManager(s3_root, storage_options=opts)
    _same(bucket.restore(), 4)
    _same(bucket.restore(checkpoint="step-00000003"), 3)
    assert all(v.ok for v in bucket.verify())


def test_a_save_does_not_wait_for_the_bucket(s3_server, s3_root, tmp_path, monkeypatch):
    release = threading.Event()
    real_put = S3Client.put

    def slow_put(self, relkey, *args, **kwargs):
        if relkey.endswith("manifest.json"):
            assert release.wait(30), "the test never released the upload"
        return real_put(self, relkey, *args, **kwargs)

    monkeypatch.setattr(S3Client, "put", slow_put)
    mgr = safepoint.CheckpointManager(
        s3_root, local_first=tmp_path / "l", storage_options=s3_server.options
    )
    mgr.save(state_of(1), step=1)
    mgr.save(state_of(2), step=2)  # returns while the first upload is held at its commit
    assert [c.step for c in mgr.checkpoints()] == [1, 2]
    _same(mgr.restore(), 2)  # read from the local copy
    assert _bucket_steps(s3_root, s3_server.options) == []
    release.set()
    mgr.close()
    assert _bucket_steps(s3_root, s3_server.options) == [1, 2]


def test_failed_uploads_are_reported_at_close_and_caught_up_later(
    s3_server, s3_root, tmp_path, monkeypatch
):
    local = tmp_path / "l"
    opts = s3_server.options
    real_commit = s3.S3Storage.commit

    def down(self, staged, name):
        raise StorageError("S3 stage 'manifest' failed: connection refused", stage="manifest")

    monkeypatch.setattr(s3.S3Storage, "commit", down)
    mgr = safepoint.CheckpointManager(s3_root, local_first=local, storage_options=opts)
    mgr.save(state_of(1), step=1)  # the save itself succeeds: committed locally
    with pytest.raises(StorageError, match=r"could not be uploaded.*step-00000001.*local disk"):
        mgr.close()
    assert _bucket_steps(s3_root, opts) == []
    monkeypatch.setattr(s3.S3Storage, "commit", real_commit)
    with safepoint.CheckpointManager(s3_root, local_first=local, storage_options=opts) as again:
        _same(again.restore(), 1)
        again.save(state_of(2), step=2)  # taking the root uploads step 1 too
    assert _bucket_steps(s3_root, opts) == [1, 2]


def test_another_machine_resumes_from_the_bucket(s3_server, s3_root, tmp_path):
    opts = s3_server.options
    keep = safepoint.Keep(last=2)
    with safepoint.CheckpointManager(
        s3_root, local_first=tmp_path / "a", storage_options=opts, keep=keep
    ) as mgr:
        mgr.save(state_of(1), step=1)
        mgr.save(state_of(2), step=2)
    with safepoint.CheckpointManager(
        s3_root, local_first=tmp_path / "b", storage_options=opts, keep=keep
    ) as other:
        _same(other.restore(), 2)  # nothing local here: read from the bucket
        other.save(state_of(3), step=3)  # retention deletes step 1 from the bucket
        assert [c.step for c in other.checkpoints()] == [2, 3]
    assert _bucket_steps(s3_root, opts) == [2, 3]


def test_a_local_directory_serves_one_run_root_only(s3_server, s3_root, tmp_path):
    opts = s3_server.options
    with safepoint.CheckpointManager(
        s3_root, local_first=tmp_path / "l", storage_options=opts
    ) as m:
        m.save(state_of(1), step=1)
    with pytest.raises(ConfigError, match="local_first directory of another root"):
        safepoint.CheckpointManager(
            f"{s3_root}-other", local_first=tmp_path / "l", storage_options=opts
        )
    assert _bucket_steps(f"{s3_root}-other", opts) == []


def test_local_first_needs_a_bucket_root_and_a_local_directory(s3_server, s3_root, tmp_path):
    with pytest.raises(ConfigError, match="Expected an s3:// root"):
        safepoint.CheckpointManager(tmp_path / "run", local_first=tmp_path / "l")
    with pytest.raises(ConfigError, match="must be a local directory"):
        safepoint.CheckpointManager(
            s3_root, local_first=f"{s3_root}-x", storage_options=s3_server.options
        )


@pytest.mark.e2e
def test_writers_killed_at_random_points_lose_nothing_committed(s3_server, s3_root, tmp_path):
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": SRC}
    local, opts, first, reported = tmp_path / "l", s3_server.options, 1, []
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, WRITER, s3_root, str(local), json.dumps(opts), str(first)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        out = proc.stdout.read().decode()
        proc.stdout.close()
        proc.wait(timeout=30)
        steps = [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
        reported += steps
        first = (reported[-1] if reported else first) + 1
        # Every save that returned is committed here, whatever the bucket has yet.
        mgr = safepoint.CheckpointManager(s3_root, local_first=local, storage_options=opts)
        listed = mgr.checkpoints()
        if reported:
            assert listed and listed[-1].step >= reported[-1]
        for ckpt in listed:
            _same(mgr.restore(checkpoint=ckpt.name), ckpt.step)
        first = max(first, (listed[-1].step + 1) if listed else first)
        mgr.close()
    assert reported, "no save returned before the kills"
    # The next writer here uploads what the kills left local-only.
    with safepoint.CheckpointManager(
        s3_root, local_first=local, storage_options=opts, keep=safepoint.Keep(last=3)
    ) as mgr:
        mgr.save(state_of(first), step=first)
        local_steps = [c.step for c in mgr.checkpoints()]
    bucket = safepoint.CheckpointManager(s3_root, storage_options=opts)
    assert [c.step for c in bucket.checkpoints()] == local_steps
    for ckpt in bucket.checkpoints():
        _same(bucket.restore(checkpoint=ckpt.name), ckpt.step)


def test_async_local_first_saves_upload_too(s3_server, s3_root, tmp_path):
    opts = s3_server.options
    with safepoint.CheckpointManager(
        s3_root, local_first=tmp_path / "l", storage_options=opts, async_save=True
    ) as mgr:
        for step in (1, 2, 3):
            mgr.save(state_of(step), step=step)
    bucket = safepoint.CheckpointManager(s3_root, storage_options=opts)
    assert [c.step for c in bucket.checkpoints()] == [1, 2, 3]
    _same(bucket.restore(), 3)


def test_a_damaged_local_file_is_never_uploaded(s3_server, s3_root, tmp_path, monkeypatch):
    opts = s3_server.options
    local = tmp_path / "l"
    release = _hold_uploads(monkeypatch)
    mgr = safepoint.CheckpointManager(s3_root, local_first=local, storage_options=opts)
    mgr.save(state_of(1), step=1)  # committed locally; its upload waits
    payload = next(p for p in (local / "step-00000001").iterdir() if p.name != "manifest.json")
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0x01  # bit rot before the upload reads it
    payload.write_bytes(bytes(data))
    release.set()
    with pytest.raises(StorageError, match=r"could not be uploaded.*step-00000001"):
        mgr.close()
    assert _bucket_steps(s3_root, opts) == []  # the damaged bytes stayed local


def test_a_failed_upload_never_empties_the_bucket(s3_server, s3_root, tmp_path, monkeypatch):
    opts, keep = s3_server.options, safepoint.Keep(last=1)
    mgr = safepoint.CheckpointManager(
        s3_root, local_first=tmp_path / "l", storage_options=opts, keep=keep
    )
    mgr.save(state_of(1), step=1)
    mgr.storage.flush()
    assert _bucket_steps(s3_root, opts) == [1]

    def down(self, staged, name):
        raise StorageError("S3 stage 'manifest' failed: connection refused", stage="manifest")

    monkeypatch.setattr(s3.S3Storage, "commit", down)
    mgr.save(state_of(2), step=2)  # retention prunes step 1 here at once
    with pytest.raises(StorageError, match="step-00000002"):
        mgr.close()
    assert _bucket_steps(s3_root, opts) == [1]  # kept until step 2 is there


def test_a_copy_the_bucket_moved_past_is_never_read_or_uploaded(s3_server, s3_root, tmp_path):
    opts = s3_server.options

    def run(where: str, value: float, name: str = "model") -> None:
        with safepoint.CheckpointManager(
            s3_root, local_first=tmp_path / where, storage_options=opts, name=name
        ) as mgr:
            mgr.save({"w": np.full(4, value)}, step=int(value))

    run("a", 1.0)  # machine A saves "model" = 1
    run("b", 2.0)  # the job moved to machine B: "model" = 2
    back = safepoint.CheckpointManager(s3_root, local_first=tmp_path / "a", storage_options=opts)
    assert back.restore().state["w"].tolist() == [2.0] * 4  # not A's stale copy
    back.save({"w": np.full(4, 3.0)}, step=3)  # A takes the root: its stale copy goes
    back.close()
    bucket = safepoint.CheckpointManager(s3_root, storage_options=opts)
    assert bucket.restore(checkpoint="model").state["w"].tolist() == [2.0] * 4
    assert not (tmp_path / "a" / "model").exists()


def test_a_checkpoint_deleted_in_the_bucket_does_not_come_back(s3_server, s3_root, tmp_path):
    opts, keep = s3_server.options, safepoint.Keep(last=1)
    with safepoint.CheckpointManager(
        s3_root, local_first=tmp_path / "a", storage_options=opts, keep=keep
    ) as mgr:
        mgr.save(state_of(1), step=1)
    with safepoint.CheckpointManager(
        s3_root, local_first=tmp_path / "b", storage_options=opts, keep=keep
    ) as mgr:
        mgr.save(state_of(2), step=2)  # deletes step 1 from the bucket
    with safepoint.CheckpointManager(
        s3_root, local_first=tmp_path / "a", storage_options=opts, keep=keep
    ) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [2]
        mgr.save(state_of(3), step=3)
    assert _bucket_steps(s3_root, opts) == [3]


def test_a_plain_run_root_is_not_taken_as_a_local_first_directory(s3_server, s3_root, tmp_path):
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(state_of(1), step=1)
    with pytest.raises(ConfigError, match="holds checkpoints but is no local_first directory"):
        safepoint.CheckpointManager(
            s3_root, local_first=tmp_path / "run", storage_options=s3_server.options
        )


def test_framework_files_do_not_wait_for_their_upload(s3_server, s3_root, tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    release = _hold_uploads(monkeypatch)

    def write(path: str) -> None:
        with h5py.File(path, "w") as f:
            f["w"] = np.arange(4.0)

    mgr = safepoint.CheckpointManager(
        s3_root, local_first=tmp_path / "l", storage_options=s3_server.options
    )
    began = time.monotonic()
    mgr.save_file("best.h5", write, step=1)
    assert time.monotonic() - began < 10  # the upload is still held
    assert [c.name for c in mgr.checkpoints()] == ["best.h5"]
    release.set()
    mgr.close()
    assert safepoint.load(f"{s3_root}/best.h5", storage_options=s3_server.options)[
        "w"
    ].tolist() == [
        0.0,
        1.0,
        2.0,
        3.0,
    ]


def test_two_managers_on_one_local_directory_are_refused(s3_server, s3_root, tmp_path):
    opts = s3_server.options
    first = safepoint.CheckpointManager(s3_root, local_first=tmp_path / "l", storage_options=opts)
    first.save(state_of(1), step=1)
    second = safepoint.CheckpointManager(
        s3_root, local_first=tmp_path / "l", storage_options=opts, name="other-{step}"
    )
    with pytest.raises(ConfigError, match="one manager per local_first directory"):
        second.save(state_of(2), step=2)
    second.close()
    first.close()
    assert _bucket_steps(s3_root, opts) == [1]
