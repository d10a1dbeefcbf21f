"""One writer per S3 root: a live lease refuses a second writer, an expired one is taken over."""

from __future__ import annotations

import time

import pytest

from safepoint.errors import StorageError

s3 = pytest.importorskip("safepoint.storage.s3")


def test_a_live_second_writer_is_refused_naming_the_lease(s3_server, s3_root):
    first = s3.S3Storage(s3_root, s3_server.options)
    second = s3.S3Storage(s3_root, s3_server.options)
    first.lock()
    with pytest.raises(StorageError, match=r"leased by another writer.*\.sp-lease\.json") as info:
        second.lock()
    assert info.value.stage == "lock"
    # both storages are this process's: the message says so, and how to share the lease
    assert "this very process" in str(info.value) and "same s3:// URL" in str(info.value)
    first.unlock()
    second.lock()  # released: taken at once
    second.unlock()


def test_lock_is_reentrant_and_cleanup_keeps_it(s3_server, s3_root):
    storage = s3.S3Storage(s3_root, s3_server.options)
    storage.lock()
    storage.lock()
    assert storage.cleanup_stale() == []
    assert storage._lease.held
    storage.unlock()
    assert not storage._lease.held


def test_a_crashed_writers_lease_is_taken_over_after_expiry(s3_server, s3_root):
    crashed = s3.S3Storage(s3_root, s3_server.options, lease_ttl=0.2)
    crashed.lock()
    staged = crashed.stage("step-1")
    crashed.write_file(f"{staged}/manifest.json", b"{}", stage="manifest")
    crashed._lease._stop.set()  # the process "dies": nobody renews the lease any more
    crashed._lease._thread.join()
    successor = s3.S3Storage(s3_root, s3_server.options)
    refused = 0
    deadline = time.monotonic() + 10
    while True:
        try:
            successor.lock()
            break
        except StorageError as exc:
            assert "leased by another writer" in str(exc)
            refused += 1
            assert time.monotonic() < deadline, "the expired lease was never taken over"
            time.sleep(0.25)
    assert refused >= 1  # it was live at first
    # The old writer, if it was only stalled, cannot commit any more.
    with pytest.raises(StorageError, match="taken over by another writer"):
        crashed.commit(staged, "step-1")
    assert successor.list_names() == []
    successor.unlock()


def test_a_dropped_storage_releases_its_lease(s3_server, s3_root):
    import gc

    dropped = s3.S3Storage(s3_root, s3_server.options)
    dropped.lock()
    del dropped
    gc.collect()
    successor = s3.S3Storage(s3_root, s3_server.options)
    successor.lock()  # no wait for an expiry
    successor.unlock()
