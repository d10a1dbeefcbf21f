"""Family 4: disk full on a real file system (a 1 MiB tmpfs, mounted for the test).

A filler file leaves a chosen amount of free space, swept in 4 KiB steps across the
size of one save, so that ENOSPC strikes at every stage a save can reach: the staging
directory, each payload page, the manifest, the run log. Every attempt must either
commit or fail cleanly: ``StorageError`` with errno ENOSPC naming its stage, the
previous checkpoint still latest and bit-exact, no staging directory left behind, and
the next save succeeds once the filler is deleted.
"""

from __future__ import annotations

import errno
import os

import pytest
from faultkit import Oracle, can_mount, leftovers, make_state, metrics_for, tmpfs

import safepoint

pytestmark = pytest.mark.skipif(can_mount() is not None, reason=str(can_mount()))

SEED = 5
NBYTES = 64 << 10  # ~70 KiB on disk per checkpoint


def _fill(path, free_bytes: int) -> None:
    """Write a filler file so that about ``free_bytes`` stay free."""
    st = os.statvfs(path)
    avail = st.f_bavail * st.f_frsize
    size = max(avail - free_bytes, 0)
    with open(path / "filler", "wb") as f:
        try:
            f.write(b"\0" * size)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.fixture
def disk(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as mnt:
        yield mnt


def test_enospc_at_every_point_of_a_save(disk):
    root = disk / "run"
    mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=2))
    mgr.save(make_state(SEED, 1, NBYTES), step=1, metrics=metrics_for(1))
    mgr.close()
    oracle = Oracle(SEED, NBYTES, keep_last=2, returned=1)
    step = 1
    stages: dict[str, int] = {}
    failures = 0
    for free_kib in range(0, 100, 4):
        _fill(disk, free_kib << 10)
        mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=2))
        try:
            mgr.save(make_state(SEED, step + 1, NBYTES), step=step + 1, metrics=metrics_for(2))
        except safepoint.StorageError as exc:
            assert exc.errno in (errno.ENOSPC, errno.EDQUOT), exc
            assert "Free space" in str(exc) and f"stage {exc.stage!r}" in str(exc), exc
            stages[exc.stage] = stages.get(exc.stage, 0) + 1
            failures += 1
            if exc.stage not in ("log", "retention"):
                assert [n for n in leftovers(root) if ".tmp-" in n] == []
                oracle.in_flight = None
            else:
                oracle.in_flight = step + 1
        else:
            oracle.returned = step + 1
            stages["committed"] = stages.get("committed", 0) + 1
        finally:
            mgr.close()
        latest = oracle.check(root)
        step = max(step, latest or step)
        oracle.returned = latest
        # Space freed: the next save succeeds.
        (disk / "filler").unlink()
        mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=2))
        mgr.save(make_state(SEED, step + 1, NBYTES), step=step + 1, metrics=metrics_for(step + 1))
        mgr.close()
        step += 1
        oracle.returned = step
        oracle.check(root)
        assert leftovers(root) == []
    print(f"\nENOSPC sweep over 25 free-space levels: {failures} failed saves by stage {stages}")
    assert failures >= 10 and stages.get("committed", 0) >= 1


def test_enospc_save_fails_cleanly_then_succeeds(disk):
    root = disk / "run"
    mgr = safepoint.CheckpointManager(root)
    small = make_state(SEED, 1, NBYTES)
    mgr.save(small, step=1)
    big = make_state(SEED, 2, 2 << 20)  # larger than the whole file system
    with pytest.raises(safepoint.StorageError) as info:
        mgr.save(big, step=2)
    assert info.value.errno == errno.ENOSPC
    assert "No space left on device" in str(info.value)
    assert leftovers(root) == []
    Oracle(SEED, NBYTES, returned=1).check(root)
    mgr.save(make_state(SEED, 2, NBYTES), step=2)  # the failed save freed its space
    mgr.close()
    Oracle(SEED, NBYTES, returned=2).check(root)
