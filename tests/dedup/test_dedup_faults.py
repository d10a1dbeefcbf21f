"""A dedup save failed at every stage it reaches (the pattern of
test_commit_transaction.py): the error is raised, the earlier checkpoints stay
listed and whole, nothing new is listed, and the next save and a gc leave a root
that verifies."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint.cli.commands import main as cli
from safepoint.errors import StorageError
from safepoint.storage.local import LocalStorage


class FailNth:
    """Fails the ``n``-th fault-hook call (counting from 1); ``n=0`` records only."""

    def __init__(self, n: int = 0) -> None:
        self.n, self.calls = n, []  # type: ignore[var-annotated]

    def __call__(self, stage: str, target: str) -> None:
        self.calls.append((stage, target))
        if len(self.calls) == self.n:
            raise OSError(errno.EIO, f"Input/output error (injected at {stage} {target})")


def _state(step: int) -> dict[str, np.ndarray]:
    return {
        "frozen": np.arange(2048, dtype=np.float32),
        "live": np.full(512, step, dtype=np.float32),
    }


def _stages() -> list[tuple[str, str]]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with safepoint.CheckpointManager(tmp, dedup=True, run_log=False) as mgr:
            mgr.save(_state(0), step=0)
        hook = FailNth()
        with safepoint.CheckpointManager(
            LocalStorage(tmp, faults=hook), dedup=True, run_log=False
        ) as mgr:
            mgr.save(_state(1), step=1)
        return hook.calls


STAGES = _stages()


def test_the_dedup_save_reaches_every_kind_of_stage() -> None:
    kinds = {stage for stage, _ in STAGES}
    assert {"stage", "open", "manifest", "rename", "dir-fsync"} <= kinds


@pytest.mark.parametrize("n", range(1, len(STAGES) + 1))
def test_a_dedup_save_failed_at_stage_n_loses_nothing(tmp_path: Path, n: int) -> None:
    with safepoint.CheckpointManager(tmp_path, dedup=True, run_log=False) as mgr:
        mgr.save(_state(0), step=0)
    hook = FailNth(n)
    with safepoint.CheckpointManager(
        LocalStorage(tmp_path, faults=hook), dedup=True, run_log=False
    ) as mgr:
        with pytest.raises((StorageError, OSError)):
            mgr.save(_state(1), step=1)
        assert [c.name for c in mgr.checkpoints()] == ["step-00000000"]
        mgr.save(_state(2), step=2)  # the device recovered
    assert cli(["gc", str(tmp_path)]) == 0
    with safepoint.CheckpointManager(tmp_path) as mgr:
        assert [c.name for c in mgr.checkpoints()] == ["step-00000000", "step-00000002"]
        assert all(v.error is None for v in mgr.verify())
        for step in (0, 2):
            got = mgr.restore(checkpoint=f"step-{step:08d}").state
            assert np.array_equal(got["live"], _state(step)["live"])
            assert np.array_equal(got["frozen"], _state(step)["frozen"])
