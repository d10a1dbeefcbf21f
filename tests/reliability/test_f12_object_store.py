"""Family 12: object stores.

This version of safepoint has no object-store backend: a URL root must be refused
clearly, before any I/O, rather than be taken for a local directory called ``s3:``.
The protocol properties of family 12 (a failed upload leaves no manifest, the manifest
is uploaded last, listing trusts manifests only) apply to the local backend too and are
checked there: ``test_save_stage_errors`` (nothing listed after any failed stage), ``test_f07``
(a directory without a manifest is never listed). The run against a real S3-compatible
server on loopback belongs with the backend, in a later issue.
"""

from __future__ import annotations

import os

import pytest

import safepoint


@pytest.mark.parametrize("url", ["s3://bucket/run", "gs://b/r", "memory://x", "file:///tmp/r"])
def test_url_roots_are_refused_before_any_io(tmp_path, url):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(safepoint.ConfigError) as info:
            safepoint.CheckpointManager(url)
        assert "object-store backend" in str(info.value) and url in str(info.value)
        assert os.listdir(tmp_path) == []  # no local directory named after the URL
    finally:
        os.chdir(cwd)
