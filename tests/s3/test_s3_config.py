"""Configuration of an S3 root: clear errors at construction, before any training time is lost."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from safepoint.errors import ConfigError, StorageError

s3 = pytest.importorskip("safepoint.storage.s3")


@pytest.fixture
def no_aws_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)


def test_environment_variables_are_enough(s3_env, s3_root):
    storage = s3.open_root(s3_root)
    storage.lock()
    storage.append_log('{"event": "hello"}')
    assert storage.read_log() == b'{"event": "hello"}\n'
    storage.unlock()


def test_storage_options_win_over_the_environment(s3_env, s3_root, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError):
        s3.S3Storage(s3_root)
    s3.S3Storage(s3_root, {"aws_secret_access_key": s3_env.secret_key})  # any spelling


def test_missing_credentials_name_what_to_set(no_aws_env, s3_server, s3_root):
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as info:
        s3.S3Storage(s3_root, {"endpoint": s3_server.endpoint})
    assert info.value.stage == "config"


def test_wrong_secret_is_refused_at_construction(s3_server, s3_root):
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY") as info:
        s3.S3Storage(s3_root, {**s3_server.options, "secret_access_key": "wrong"})
    assert info.value.stage == "config"


def test_missing_bucket_is_named(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        s3.S3Storage("s3://no-such-bucket/run", s3_server.options)


def test_wrong_endpoint_fails_fast_and_names_it(no_aws_env, s3_server, s3_root):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"Cannot reach.*'http://127.0.0.1:{port}'") as info:
        s3.S3Storage(s3_root, {**s3_server.options, "endpoint": f"http://127.0.0.1:{port}"})
    assert time.monotonic() - started < 10
    assert info.value.stage == "config"


@pytest.mark.parametrize(
    "url", ["s3://", "s3:///prefix", "s3://Bad_Bucket!/x", "s3://bucket/a/../b", "gs://bucket/x"]
)
def test_malformed_urls_are_config_errors(url):
    with pytest.raises(ConfigError, match="s3://BUCKET/PREFIX"):
        s3.S3Storage(url, {"access_key_id": "k", "secret_access_key": "s"})


def test_import_safepoint_does_not_load_obstore():
    code = "import sys, safepoint; assert 'obstore' not in sys.modules, 'obstore loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
