"""A real S3 server for the object-storage tests: SeaweedFS, one per session (``weed.py``).

Each test gets its own key prefix (``s3_root``), so one server serves the whole session;
a test that kills its server gets one of its own (``private_s3``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from weed import ACCESS_KEY, BUCKET, SECRET_KEY, S3Server, WeedMissing, WeedProcess

from safepoint_testing import mark_folder


def _process(base: Path) -> WeedProcess:
    pytest.importorskip("obstore")  # the s3 extra
    try:
        return WeedProcess(base)
    except WeedMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = _process(tmp_path_factory.mktemp("seaweedfs"))
    try:
        took = weed.start()
        yield S3Server(weed.server.endpoint, ACCESS_KEY, SECRET_KEY, BUCKET, started_in=took)
    finally:
        weed.stop()


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[WeedProcess]:
    """A server of this test's own, which the test may kill and restart."""
    weed = _process(tmp_path / "seaweedfs")
    try:
        weed.start()
        yield weed
    finally:
        weed.stop()


@pytest.fixture
def s3_root(s3_server: S3Server) -> str:
    """A fresh ``s3://bucket/prefix`` root for one test."""
    return f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server's endpoint and credentials in the standard ``AWS_*`` variables."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    return s3_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test here talks to a real S3 server process: the e2e set (``make test``
    runs it, ``make test-fast`` leaves it out)."""
    mark_folder(items, __file__, [pytest.mark.e2e])
