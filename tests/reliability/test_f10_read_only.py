"""Family 10: a read-only root (a tmpfs remounted ``ro``): saves fail clearly, reads work.

Restoring, listing, verifying and the CLI must work on a read-only root and must not
try to write anything: the test snapshots every entry's bytes and times before and
compares afterwards.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from faultkit import Oracle, can_mount, make_state, remount, tmpfs

import safepoint
from safepoint.cli import main as cli

pytestmark = pytest.mark.skipif(can_mount() is not None, reason=str(can_mount()))

SEED = 8
NBYTES = 64 << 10


def _snapshot(root) -> dict[str, tuple]:
    out = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(here, name)
            st = os.lstat(path)
            data = Path(path).read_bytes() if os.path.isfile(path) else b""
            out[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, data)
    return out


@pytest.fixture
def ro_root(tmp_path):
    with tmpfs(tmp_path / "disk", "4m") as mnt:
        root = mnt / "run"
        mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=3))
        for step in (1, 2):
            mgr.save(make_state(SEED, step, NBYTES), step=step)
        mgr.close()
        (root / "step-00000003.tmp-dead").mkdir()  # a crashed writer's leftover
        remount(mnt, "ro")
        try:
            yield root
        finally:
            remount(mnt, "rw")


def test_save_to_read_only_root_raises_clearly(ro_root):
    before = _snapshot(ro_root)
    mgr = safepoint.CheckpointManager(ro_root)
    with pytest.raises(safepoint.StorageError) as info:
        mgr.save(make_state(SEED, 3, NBYTES), step=3)
    assert info.value.errno == errno.EROFS, info.value
    assert "read-only" in str(info.value)
    mgr.close()
    assert _snapshot(ro_root) == before


def test_restore_from_read_only_root_writes_nothing(ro_root, capsys):
    before = _snapshot(ro_root)
    Oracle(SEED, NBYTES, keep_last=3, returned=2).check(ro_root)
    tree = safepoint.load(ro_root / "step-00000001")
    assert tree["step"] == 1
    mgr = safepoint.CheckpointManager(ro_root)
    assert [v.ok for v in mgr.verify()] == [True, True]
    state = {"model": {"w": None}}
    assert mgr.restore(missing_ok=True).step == 2 and state
    assert cli(["ls", str(ro_root)]) == 0
    assert cli(["verify", str(ro_root)]) == 0
    assert cli(["verify", "--deep", str(ro_root)]) == 0
    capsys.readouterr()
    done = subprocess.run(
        [sys.executable, "-m", "safepoint.cli", "show", str(ro_root / "step-00000002")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert _snapshot(ro_root) == before
