"""Family 1: an exception at every stage of a save, through the storage interface.

``LocalStorage``'s ``faults`` hook is called before each stage acts (staging
mkdir, opening and writing each payload, every fsync, the manifest, the directory
fsyncs, the rename, each retention deletion). A probe save records the sequence; then
each position in turn raises EIO. The save must raise ``StorageError`` naming that
stage, the previous checkpoint must still be latest and restore bit-exactly (unless the
failure came after the commit, in retention), and nothing staged may be left behind.
"""

from __future__ import annotations

import errno
import shutil

import pytest
from faultkit import Oracle, leftovers, make_state, metrics_for

import safepoint
from safepoint_testing import Faults, fail_at, faulty_manager

SEED = 17
NBYTES = 128 << 10


@pytest.mark.parametrize("fmt", ["safetensors", "hdf5"])
@pytest.mark.parametrize("keep", [None, 1], ids=["keep-all", "keep-last-1"])
def test_error_at_every_stage(tmp_path, fmt, keep):
    if fmt == "hdf5":
        pytest.importorskip("h5py")
    template = tmp_path / "template"
    mgr = safepoint.CheckpointManager(template, format=fmt, shard_bytes=48 << 10)
    for step in (1, 2):
        mgr.save(make_state(SEED, step, NBYTES), step=step, metrics=metrics_for(step))
    mgr.close()

    def save(faults: Faults) -> None:
        m = faulty_manager(
            root,
            faults,
            format=fmt,
            shard_bytes=48 << 10,
            keep=safepoint.Keep(last=keep) if keep else None,
        )
        try:
            m.save(make_state(SEED, 3, NBYTES), step=3, metrics=metrics_for(3))
        finally:
            m.close()

    root = tmp_path / "run"
    shutil.copytree(template, root)
    probe = Faults()
    save(probe)
    stages = probe.stages
    assert {"stage", "manifest", "dir-fsync", "rename"} <= set(stages), stages
    if keep:
        assert "retention" in stages
    for k, stage in enumerate(stages, 1):
        shutil.rmtree(root)
        shutil.copytree(template, root)
        with pytest.raises(safepoint.StorageError) as info:
            save(fail_at(None, nth=k))  # EIO at the k-th stage of any kind
        err = info.value
        # The manifest's own fsync is part of writing the commit record.
        named = "manifest" if stage == "fsync" and stages[k - 2] == "manifest" else stage
        assert err.stage == named, (k, stage, err)
        assert err.errno == errno.EIO
        outcome = "new checkpoint was committed" if stage == "retention" else "intact"
        assert f"stage {named!r}" in str(err) and outcome in str(err)
        assert [n for n in leftovers(root) if ".tmp-" in n] == [], (stage, leftovers(root))
        committed = stage == "retention" or (stage == "dir-fsync" and "rename" in stages[: k - 1])
        oracle = Oracle(SEED, NBYTES, keep_last=keep, returned=2)
        if stage == "retention":
            oracle.in_flight = 3
        latest = oracle.check(root)
        assert latest == (3 if stage == "retention" else 2), (stage, latest, committed)
    print(f"\n[{fmt}, keep={keep}] EIO at each of {len(stages)} stages: {stages}")
