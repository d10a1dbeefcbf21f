"""Hostile keys (from a manifest, or metadata planted in the bucket) never leave their save."""

from __future__ import annotations

import pytest

from safepoint.errors import CorruptCheckpointError

s3 = pytest.importorskip("safepoint.storage.s3")
obstore = pytest.importorskip("obstore")


@pytest.fixture
def storage(s3_server, s3_root):
    st = s3.S3Storage(s3_root, s3_server.options)
    st.lock()
    staged = st.stage("step-1")
    st.write_file(f"{staged}/a.bin", b"mine")
    st.write_file(f"{staged}/manifest.json", b"{}", stage="manifest")
    st.commit(staged, "step-1")
    yield st
    st.unlock()


@pytest.mark.parametrize(
    "relpath",
    [
        "step-1/../step-2/a.bin",
        "../outside",
        "/etc/passwd",
        "step-1//a.bin",
        "step-1/.sp-lease.json",
        ".sp-data/0123456789abcdef/a.bin",
        ".sp.tmp-0123456789abcdef/a.bin",  # another save's staging area
        "step-1/a\x00.bin",
    ],
)
def test_paths_out_of_a_checkpoint_are_refused(storage, relpath):
    with pytest.raises(CorruptCheckpointError):
        storage.read_bytes(relpath, max_size=100)
    with pytest.raises(CorruptCheckpointError):
        storage.open_read(relpath)


@pytest.mark.parametrize("planted", ["../../other", "0123/../../x", "", None])
def test_a_record_naming_a_foreign_payload_prefix_is_refused(storage, s3_server, planted):
    store = s3_server.store()
    key = f"{storage.location.key('evil')}/manifest.json"
    attrs = {"safepoint-save": planted} if planted is not None else None
    obstore.put(store, key, b"{}", attributes=attrs)
    assert storage.is_dir("evil")  # listed: the catalog then parses and verifies it
    with pytest.raises(CorruptCheckpointError, match="does not name its payload"):
        storage.read_bytes("evil/a.bin", max_size=100)
    assert storage.read_bytes("step-1/a.bin", max_size=100) == b"mine"


def test_names_given_to_the_writer_are_checked(storage):
    from safepoint.errors import ConfigError

    for name in ("../x", ".sp-data", "a/b", ""):
        with pytest.raises(ConfigError):
            storage.stage(name)
        with pytest.raises(ConfigError):
            storage.remove(name)


def test_retention_removes_a_record_that_names_no_payload(storage, s3_server):
    key = f"{storage.location.key('evil')}/manifest.json"
    obstore.put(s3_server.store(), key, b"{}", attributes={"safepoint-save": "../x"})
    storage.remove("evil")
    assert storage.list_names() == ["step-1"]
    assert storage.read_bytes("step-1/a.bin", max_size=100) == b"mine"
