"""The test server itself: fast to start, and it enforces what safepoint relies on."""

from __future__ import annotations

import pytest

obstore = pytest.importorskip("obstore")
from obstore.exceptions import AlreadyExistsError, PermissionDeniedError, PreconditionError  # noqa: E402


def test_starts_quickly(s3_server):
    assert s3_server.started_in < 10.0, s3_server.started_in


def test_conditional_create_and_update_are_enforced(s3_server, s3_root):
    store = s3_server.store()
    key = s3_root.split("/", 3)[3] + "/record"
    first = obstore.put(store, key, b"one", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, key, b"two", mode="create")
    with pytest.raises(PreconditionError):
        obstore.put(store, key, b"two", mode={"e_tag": '"not-the-etag"'})
    obstore.put(store, key, b"three", mode={"e_tag": first["e_tag"]})
    assert bytes(obstore.get(store, key).bytes()) == b"three"


def test_multipart_upload_and_range_read(s3_server, s3_root):
    store = s3_server.store()
    key = s3_root.split("/", 3)[3] + "/big"
    data = bytes(range(256)) * (48 << 10)  # 12 MiB: three 5 MiB parts
    obstore.put(store, key, data, chunk_size=5 << 20, use_multipart=True, max_concurrency=3)
    meta = obstore.head(store, key)
    assert meta["size"] == len(data)
    assert meta["e_tag"].endswith('-3"')  # an S3 multipart ETag: <md5 of md5s>-<parts>
    assert (
        bytes(obstore.get_range(store, key, start=7 << 20, end=(7 << 20) + 9))
        == data[7 << 20 : (7 << 20) + 9]
    )


def test_signatures_are_checked(s3_server):
    from obstore.store import S3Store

    wrong = S3Store(
        s3_server.bucket,
        config={**s3_server.options, "secret_access_key": "wrong"},
        client_options={"allow_http": True},
    )
    with pytest.raises(PermissionDeniedError):
        obstore.head(wrong, "anything")
