"""The manifest's conditional create is the commit: a lost race is detected, never overwritten."""

from __future__ import annotations

import errno

import pytest

from safepoint.errors import StorageError

s3 = pytest.importorskip("safepoint.storage.s3")


def _stage(storage, name, payload):
    staged = storage.stage(name)
    storage.write_file(f"{staged}/a.bin", payload)
    storage.write_file(f"{staged}/manifest.json", b'{"by": "%s"}' % payload, stage="manifest")
    return staged


def test_two_writers_one_wins_the_other_gets_a_clear_error(s3_server, s3_root, monkeypatch):
    first = s3.S3Storage(s3_root, s3_server.options)
    second = s3.S3Storage(s3_root, s3_server.options)
    first.lock()
    # The second writer's lease check passed just before the first one committed (the
    # window a stalled writer has): only the conditional create stands between them.
    monkeypatch.setattr(second._lease, "check", lambda: None)
    a = _stage(first, "step-1", b"first")
    b = _stage(second, "step-1", b"second")
    first.commit(a, "step-1")
    with pytest.raises(StorageError, match="committed by another save") as info:
        second.commit(b, "step-1")
    assert info.value.errno == errno.EEXIST and info.value.stage == "manifest"
    second.discard(b)
    reader = s3.S3Storage(s3_root, s3_server.options)
    assert reader.read_bytes("step-1/manifest.json", max_size=100) == b'{"by": "first"}'
    assert reader.read_bytes("step-1/a.bin", max_size=100) == b"first"
    assert len({m["path"].split("/")[1] for m in reader.client.list_all(".sp-data/")}) == 1
    first.unlock()


def test_a_resave_raced_by_another_commit_is_refused(s3_server, s3_root, monkeypatch):
    """Re-saving a name uses If-Match on the ETag seen at stage time."""
    first = s3.S3Storage(s3_root, s3_server.options)
    first.lock()
    first.commit(_stage(first, "last", b"v1"), "last")
    second = s3.S3Storage(s3_root, s3_server.options)
    monkeypatch.setattr(second._lease, "check", lambda: None)
    b = _stage(second, "last", b"v3")  # sees v1
    first.commit(_stage(first, "last", b"v2"), "last")  # replaces v1 meanwhile
    with pytest.raises(StorageError, match="committed by another save"):
        second.commit(b, "last")
    assert first.read_bytes("last/a.bin", max_size=10) == b"v2"
    first.unlock()


def test_a_retried_commit_that_already_landed_is_success(s3_server, s3_root, monkeypatch):
    storage = s3.S3Storage(s3_root, s3_server.options)
    storage.lock()
    staged = _stage(storage, "step-1", b"x")
    real = storage.client.put

    def lost_answer(key, data, **kw):
        result = real(key, data, **kw)  # the first try lands, its answer is lost, the
        if key.endswith("manifest.json"):  # retry sees 412
            raise StorageError("precondition failed", errno=errno.EEXIST, stage="manifest")
        return result

    monkeypatch.setattr(storage.client, "put", lost_answer)
    storage.commit(staged, "step-1")
    monkeypatch.undo()
    assert storage.list_names() == ["step-1"]
    assert storage.read_bytes("step-1/a.bin", max_size=10) == b"x"
    storage.unlock()


def test_commit_needs_the_lease(s3_server, s3_root):
    storage = s3.S3Storage(s3_root, s3_server.options)
    staged = _stage(storage, "step-1", b"x")
    with pytest.raises(StorageError, match=r"lease .* is not held"):
        storage.commit(staged, "step-1")
    storage.discard(staged)
    assert storage.list_names() == []
