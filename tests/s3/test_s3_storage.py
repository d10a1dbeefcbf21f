"""S3Storage at the protocol level, against the real server: the commit without rename."""

from __future__ import annotations

import pytest

from safepoint.errors import CorruptCheckpointError, StorageError
from safepoint.storage.protocol import LocalFiles

s3 = pytest.importorskip("safepoint.storage.s3")
obstore = pytest.importorskip("obstore")


def _save(storage, name, files, manifest=b'{"m": 1}'):
    """One save through the protocol, in the order the catalog's writer uses."""
    staged = storage.stage(name)
    for fname, data in files.items():
        writer = storage.open_write(f"{staged}/{fname}")
        writer.write([memoryview(data)])
        writer.close()
    storage.write_file(f"{staged}/manifest.json", manifest, stage="manifest")
    storage.commit(staged, name)
    return staged


@pytest.fixture
def storage(s3_server, s3_root):
    st = s3.S3Storage(s3_root, s3_server.options)
    st.lock()
    yield st
    st.unlock()


def test_round_trip_through_the_protocol(storage):
    big = bytes(range(256)) * (80 << 10)  # 20 MiB: a multipart upload
    _save(storage, "step-1", {"model.safetensors": big, "small.bin": b"abc"})
    assert storage.list_names() == ["step-1"]
    assert storage.is_dir("step-1") and not storage.is_dir("step-2")
    assert storage.read_bytes("step-1/manifest.json", max_size=1 << 20) == b'{"m": 1}'
    assert storage.size("step-1/model.safetensors") == len(big)
    assert storage.read_bytes("step-1/small.bin", max_size=10) == b"abc"
    with storage.open_read("step-1/model.safetensors") as f:
        f.seek(5 << 20)
        assert f.read(100) == big[5 << 20 : (5 << 20) + 100]
        f.seek(0)
        assert f.read() == big
    assert storage.exists("step-1/small.bin") and not storage.exists("step-1/nope.bin")
    assert not isinstance(storage, LocalFiles)  # no mmap, O_DIRECT or paths on a bucket
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("step-9/manifest.json", max_size=100)
    with pytest.raises(CorruptCheckpointError):
        storage.read_bytes("step-1/small.bin", max_size=2)


def test_nothing_is_listed_before_the_manifest_is_committed(storage, s3_server):
    staged = storage.stage("step-1")
    w = storage.open_write(f"{staged}/model.safetensors")
    w.write([memoryview(b"x" * 1000)])
    w.close()
    storage.write_file(f"{staged}/manifest.json", b"{}", stage="manifest")
    assert storage.list_names() == []  # payload up, manifest not yet: nothing listed
    assert not storage.exists("step-1")
    storage.commit(staged, "step-1")
    assert storage.list_names() == ["step-1"]


def test_discard_removes_the_payload(storage):
    staged = storage.stage("step-1")
    w = storage.open_write(f"{staged}/a.bin")
    w.write([memoryview(b"x")])
    w.close()
    storage.discard(staged)
    assert list(storage.client.list_all(".sp-data/")) == []
    assert storage.list_names() == []


def test_resave_of_a_name_replaces_it_and_frees_the_old_payload(storage):
    _save(storage, "last", {"a.bin": b"old"}, manifest=b'{"v": 1}')
    _save(storage, "last", {"a.bin": b"new"}, manifest=b'{"v": 2}')
    assert storage.read_bytes("last/a.bin", max_size=10) == b"new"
    assert storage.read_bytes("last/manifest.json", max_size=100) == b'{"v": 2}'
    assert len({m["path"].split("/")[1] for m in storage.client.list_all(".sp-data/")}) == 1


def test_retention_deletes_the_manifest_first(storage, monkeypatch):
    _save(storage, "step-1", {"a.bin": b"one"})
    _save(storage, "step-2", {"a.bin": b"two"})
    deleted = []
    real = storage.client.delete

    def spy(keys, *, stage):
        deleted.append(list(keys))
        if any(k.startswith(".sp-data/") for k in keys):
            raise StorageError("injected: the payload delete fails", stage=stage)
        real(keys, stage=stage)

    monkeypatch.setattr(storage.client, "delete", spy)
    storage.remove("step-1")  # the record goes; the payload delete "crashes"
    assert deleted[0] == ["step-1/manifest.json"]
    assert storage.list_names() == ["step-2"]
    monkeypatch.undo()
    # The orphaned payload is not listed, and gc removes it once past the grace period.
    storage.stale_after = -1.0
    removed = storage.cleanup_stale()
    assert len(removed) == 1 and removed[0].startswith(".sp-data/")
    assert storage.read_bytes("step-2/a.bin", max_size=10) == b"two"


def test_cleanup_keeps_young_unreferenced_payload(storage):
    staged = storage.stage("step-1")
    storage.write_file(f"{staged}/a.bin", b"in flight")
    storage.stale_after = 3600.0
    assert storage.cleanup_stale() == []
    storage.stale_after = -1.0
    assert storage.cleanup_stale() == []  # a save in flight in this process is never touched
    from safepoint.storage.s3 import writers

    writers.LIVE.difference_update(storage._staged)  # as if the writer crashed
    storage._staged.clear()
    assert len(storage.cleanup_stale()) == 1


def test_run_log_is_one_object_per_event_read_in_order(storage):
    assert storage.read_log() == b""
    for i in range(5):
        storage.append_log(f'{{"i": {i}}}')
    assert storage.read_log().splitlines() == [f'{{"i": {i}}}'.encode() for i in range(5)]


def test_an_aborted_upload_leaves_no_object(storage):
    staged = storage.stage("step-1")
    writer = storage.open_write(f"{staged}/big.bin")
    writer.write([memoryview(b"z" * (40 << 20))])  # parts of a multipart upload went up
    writer.abort()
    assert not storage.exists(f"{staged}/big.bin")
    writer = storage.open_write(f"{staged}/small.bin")
    writer.write([memoryview(b"z" * 10)])
    writer.abort()  # never left the buffer
    assert not storage.exists(f"{staged}/small.bin")
    storage.discard(staged)
