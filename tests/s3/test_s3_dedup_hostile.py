"""Dedup on a bucket under attack (issue 15; findings of a hostile review, each a test):
a collection racing a save's existence check, a record that is not a manifest, a
collector that lost its lease, a blob damaged at rest, an oversized record, and a
missing blob's error message."""

from __future__ import annotations

import json
from typing import Any

import pytest

import safepoint
from safepoint.errors import CorruptCheckpointError, StorageError

torch = pytest.importorskip("torch")
s3 = pytest.importorskip("safepoint.storage.s3")
from safepoint.storage.s3 import blobs as s3_blobs  # noqa: E402

N = 64 * 1024


def _blobs(storage: Any) -> set[str]:
    return {m["path"].split("/", 1)[1] for m in storage.client.list_all(".sp-blobs/")}


def _one_blob_root(s3_root: str, options: dict) -> tuple[Any, str, Any]:
    """A manager (open) whose step 1 holds one blob, the blob's key, the tensor."""
    base = torch.arange(N, dtype=torch.float32)
    mgr = safepoint.CheckpointManager(s3_root, storage_options=options, dedup=True)
    mgr.save({"a": base}, step=1)
    (key,) = set(mgr.storage.record_refs("step-00000001").values())
    return mgr, key, base


def test_a_collection_between_a_head_and_its_cache_entry_is_not_cached(
    s3_server, s3_root, monkeypatch
):
    mgr, key, _ = _one_blob_root(s3_root, s3_server.options)
    try:
        mgr.delete("step-00000001")  # the blob is unreferenced now
        storage = mgr.storage
        assert storage._held is not None
        storage._held.blobs.known.clear()  # as for a key another manager's save found
        checker = storage.blob_store()
        real_head = s3_blobs.S3BlobStore._head

        def head_then_collect(self: Any, k: str) -> int | None:
            size = real_head(self, k)
            if self is checker:  # the HEAD answered "exists"; a collection runs now
                assert storage.blob_store().collect(grace_s=0)[0] == 1
            return size

        monkeypatch.setattr(s3_blobs.S3BlobStore, "_head", head_then_collect)
        assert checker.has(key)  # true when asked...
        monkeypatch.setattr(s3_blobs.S3BlobStore, "_head", real_head)
        assert key not in _blobs(storage)
        # ...but not remembered: a save's link checks again and finds it gone
        assert not storage.blob_store().link(key, "unused")
    finally:
        mgr.close()


def test_a_record_that_is_not_a_manifest_stops_collection(s3_server, s3_root):
    mgr, key, base = _one_blob_root(s3_root, s3_server.options)
    mgr.close()
    storage = s3.S3Storage(s3_root, s3_server.options)
    data, _, attrs = storage.client.get("step-00000001/manifest.json")
    storage.client.put("step-00000001/manifest.json", data + b"x", stage="test", attributes=attrs)
    storage.lock()
    try:
        assert storage.blob_store().collect(grace_s=0) == (0, 0)  # nothing deleted
    finally:
        storage.unlock()
    assert key in _blobs(storage)
    storage.client.put("step-00000001/manifest.json", data, stage="test", attributes=attrs)
    got = safepoint.load(f"{s3_root}/step-00000001", storage_options=s3_server.options)
    assert torch.equal(torch.as_tensor(got["a"]), base)


def test_a_collector_that_lost_its_lease_deletes_nothing(s3_server, s3_root):
    mgr, key, _ = _one_blob_root(s3_root, s3_server.options)
    mgr.delete("step-00000001")
    storage = mgr.storage
    # another writer took the root over (the lease object is no longer ours)
    body = json.loads(storage.client.get(".sp-lease.json")[0])
    body["owner"] = "someone-else"
    storage.client.put(".sp-lease.json", json.dumps(body).encode(), stage="test")
    with pytest.raises(StorageError):
        storage.blob_store().collect(grace_s=0)
    assert key in _blobs(storage)
    mgr.close()


def test_a_blob_damaged_in_the_bucket_is_uploaded_again(s3_server, s3_root, caplog):
    mgr, key, base = _one_blob_root(s3_root, s3_server.options)
    mgr.close()
    storage = mgr.storage
    data = bytearray(storage.client.get(f".sp-blobs/{key}")[0])
    data[-1] ^= 0xFF
    storage.client.put(f".sp-blobs/{key}", bytes(data), stage="test")
    with safepoint.CheckpointManager(s3_root, storage_options=s3_server.options) as reader:
        assert not reader.verify()[0].ok
    # a new writer process finds the key, checks the stored bytes once, and repairs them
    with safepoint.CheckpointManager(s3_root, storage_options=s3_server.options, dedup=True) as mgr:
        mgr.save({"a": base}, step=2)
        assert all(v.ok for v in mgr.verify())  # step 1 is whole again
    assert "damaged in the bucket" in caplog.text


def test_an_oversized_record_is_refused_unread(s3_server, s3_root, monkeypatch):
    mgr, _, _ = _one_blob_root(s3_root, s3_server.options)
    mgr.close()
    from safepoint.storage.s3 import backend

    monkeypatch.setattr(backend, "MAX_RECORD", 100)
    storage = s3.S3Storage(s3_root, s3_server.options)
    with pytest.raises(CorruptCheckpointError, match="Expected at most 100"):
        storage.record_refs("step-00000001")


def test_a_missing_blob_is_named_by_its_file(s3_server, s3_root):
    mgr, key, _ = _one_blob_root(s3_root, s3_server.options)
    mgr.close()
    mgr.storage.client.delete([f".sp-blobs/{key}"], stage="test")
    with pytest.raises(CorruptCheckpointError) as info:
        safepoint.load(f"{s3_root}/step-00000001", storage_options=s3_server.options)
    text = str(info.value)
    assert "step-00000001/model-00000.safetensors" in text and "shared dedup blob" in text
