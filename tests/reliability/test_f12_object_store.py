"""Family 12: object stores.

``s3://`` roots go to the S3 backend (tests/s3 runs it against a real SeaweedFS
server); any other URL is refused clearly, before any I/O, rather than be taken for a
local directory called ``gs:``. An s3:// root that cannot be reached is a
``StorageError`` at construction, never a local directory named after the URL.
"""

from __future__ import annotations

import os

import pytest

import safepoint


@pytest.mark.parametrize("url", ["gs://b/r", "memory://x", "file:///tmp/r"])
def test_unsupported_url_roots_are_refused_before_any_io(tmp_path, url):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(safepoint.ConfigError) as info:
            safepoint.CheckpointManager(url)
        assert "Unsupported URL scheme" in str(info.value) and url in str(info.value)
        assert os.listdir(tmp_path) == []  # no local directory named after the URL
    finally:
        os.chdir(cwd)


def test_an_unreachable_s3_root_fails_at_construction_not_locally(tmp_path, monkeypatch):
    pytest.importorskip("obstore")
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    options = {
        "endpoint": "http://127.0.0.1:9",  # discard port: nothing listens
        "access_key_id": "x",
        "secret_access_key": "y",
        "region": "us-east-1",
    }
    with pytest.raises(safepoint.StorageError):
        safepoint.CheckpointManager("s3://bucket/run", storage_options=options)
    assert os.listdir(tmp_path) == []


def test_storage_options_on_a_local_root_are_refused(tmp_path):
    with pytest.raises(safepoint.ConfigError, match="storage_options"):
        safepoint.CheckpointManager(tmp_path / "run", storage_options={"region": "x"})
