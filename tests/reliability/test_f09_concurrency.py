"""Family 9: one writer per root (a second one fails clearly); readers race writers safely.

Distributed saves (ranks writing shards, rank 0 committing) are not part of this
version of safepoint, so the "one rank fails mid-write" case has nothing to run yet.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from faultkit import digest, expected_digest, fork, make_state, read_until, saver_loop

import safepoint

SEED = 29
NBYTES = 256 << 10


def test_second_writer_in_the_same_process_shares_the_root(tmp_path):
    """Several managers of one process may write one root (issue 10 item 8): they share
    the writer lock and never take the same seq; another process is still refused
    (next test)."""
    root = tmp_path / "run"
    first = safepoint.CheckpointManager(root)
    first.save(make_state(SEED, 1, NBYTES), step=1)
    second = safepoint.CheckpointManager(root, name="other-{step:08d}")
    second.save(make_state(SEED, 2, NBYTES), step=2)
    first.save(make_state(SEED, 3, NBYTES), step=3)
    listed = second.checkpoints()
    assert [(c.name, c.seq) for c in listed] == [
        ("step-00000001", 1),
        ("other-00000002", 2),
        ("step-00000003", 3),
    ]
    first.close()
    second.save(make_state(SEED, 4, NBYTES), step=4)
    second.close()
    assert [c.seq for c in safepoint.CheckpointManager(root).checkpoints()] == [1, 2, 3, 4]


@pytest.mark.e2e
def test_second_writer_in_another_process_fails_until_the_first_dies(tmp_path):
    root = tmp_path / "run"
    r, w = os.pipe()

    def holder() -> None:
        mgr = safepoint.CheckpointManager(root)
        mgr.save(make_state(SEED, 1, NBYTES), step=1)
        os.write(w, b"x")
        time.sleep(60)

    pid = fork(holder)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        mgr = safepoint.CheckpointManager(root)
        with pytest.raises(safepoint.StorageError) as info:
            mgr.save(make_state(SEED, 2, NBYTES), step=2)
        assert info.value.stage == "lock"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    mgr.save(make_state(SEED, 2, NBYTES), step=2)  # the kernel dropped the dead one's lock
    mgr.close()
    assert [c.step for c in safepoint.CheckpointManager(root).checkpoints()] == [1, 2]


@pytest.mark.e2e
@pytest.mark.parametrize("keep_last", [None, 2], ids=["keep-all", "keep-last-2"])
def test_reader_racing_a_writer_never_sees_a_partial_checkpoint(tmp_path, keep_last):
    root = str(tmp_path / "run")
    r, w = os.pipe()
    pid = fork(
        lambda: saver_loop(
            root, seed=SEED, nbytes=NBYTES, keep_last=keep_last, report=w, steps=100_000
        )
    )
    os.close(w)
    reads = gone = 0
    deadline = time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline:
            mgr = safepoint.CheckpointManager(root)
            try:
                got = mgr.restore(missing_ok=True)
            except safepoint.CheckpointNotFoundError:
                # Retention deleted the checkpoint between listing and reading: an
                # honest "not there", never a partial one.
                assert keep_last is not None
                gone += 1
                continue
            if got is None:
                continue
            assert digest(got.state) == expected_digest(SEED, got.step, NBYTES), got.name
            for v in mgr.verify():
                assert v.ok or isinstance(v.error, safepoint.CheckpointNotFoundError), v
            reads += 1
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        report = read_until(r).decode()
        os.close(r)
    saves = report.count("done ")
    print(
        f"\n[{keep_last=}] {reads} full restores raced {saves} saves; "
        f"{gone} lost a race to retention"
    )
    assert "error" not in report, report[-2000:]
    assert reads >= 5 and saves >= 5


class DeletedWhileRead(safepoint.storage.local.LocalStorage):
    """A reader's storage; when it opens ``victim``'s payload, the writer (another
    manager) has just saved two more checkpoints and its retention deleted the victim."""

    def __init__(self, root, victim: str, writer) -> None:
        super().__init__(root)
        self.victim, self.writer, self.fired = victim, writer, False

    def open_read(self, relpath):
        if relpath.startswith(self.victim + "/") and not self.fired:
            self.fired = True
            self.writer()
        return super().open_read(relpath)


def test_restore_latest_survives_retention_deleting_what_it_listed(tmp_path):
    root = tmp_path / "run"
    writer = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=2))
    for step in (1, 2, 3):
        writer.save(make_state(SEED, step, NBYTES), step=step)

    def race() -> None:
        for step in (4, 5):
            writer.save(make_state(SEED, step, NBYTES), step=step)

    reader = safepoint.CheckpointManager(DeletedWhileRead(root, "step-00000003", race))
    got = reader.restore()  # listed [2, 3]; 3 vanishes mid-read; 4 and 5 now exist
    assert got.step == 5 and digest(got.state) == expected_digest(SEED, 5, NBYTES)
    writer.close()

    # verify() racing the same deletion reports the vanished checkpoint as gone, not
    # as corrupt or never committed.
    for step in (6, 7):
        writer = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=2))
        writer.save(make_state(SEED, step, NBYTES), step=step)
        writer.close()
    writer = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=2))

    def race2() -> None:
        for step in (8, 9):
            writer.save(make_state(SEED, step, NBYTES), step=step)

    results = safepoint.CheckpointManager(DeletedWhileRead(root, "step-00000006", race2)).verify()
    assert all(v.ok for v in results), results
    writer.close()
