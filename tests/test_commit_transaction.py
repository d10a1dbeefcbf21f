"""One commit transaction for both kinds of target (issue 11 item 1).

A checkpoint directory (``CheckpointManager.save``) and a single framework file
(``CheckpointManager.save_file``) go through :mod:`safepoint.storage.commit`: an error
at any stage of a re-save of a committed name, with or without ``RENAME_EXCHANGE``
(and, for files, without hard links), must leave the same outcome for both: the old
checkpoint listed, whole, under its name; no hidden entry left; the stage reported.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint.storage import commit as transaction
from safepoint.storage.local import LocalStorage

h5py = pytest.importorskip("h5py")

#: The stages of the transaction an injected error fails, per kind of target: staging,
#: the write, sealing the manifest, fsync of the staged target, the swap, the root fsync.
STAGES = {
    "directory": ["stage", "write", "manifest", "dir-fsync:staged", "rename", "dir-fsync:root"],
    "file": ["stage", "write", "manifest", "fsync", "rename", "dir-fsync:root"],
}


class Failing:
    """A fault hook failing the first call of ``fail`` (``"dir-fsync:root"``: the
    root's fsync only); ``LocalStorage(root, faults=Failing())``."""

    def __init__(self) -> None:
        self.fail: str | None = None

    def __call__(self, stage: str, target: str) -> None:
        if self.fail is None:
            return
        want, _, where = self.fail.partition(":")
        if stage != want:
            return
        staged = target.startswith(".sp.tmp-")
        if where == "staged" and not staged:
            return
        if where == "root" and staged:
            return
        self.fail = None
        raise OSError(errno.EIO, "Input/output error (injected)")


def _save(mgr: safepoint.CheckpointManager, kind: str, value: float) -> None:
    if kind == "directory":
        mgr.save({"w": np.full(4, value, np.float32)}, step=1)
        return

    def write(path: str) -> None:
        with h5py.File(path, "w") as f:
            f["w"] = np.full(4, value, np.float32)

    mgr.save_file("w.h5", write, step=1, epoch=1, metrics={})


def _value(root: Path, name: str) -> float:
    ckpt = safepoint.CheckpointManager(root).restore(checkpoint=name)
    assert ckpt is not None
    state: Any = ckpt.state
    return float(np.asarray(state["w"]).reshape(-1)[0])


@pytest.mark.parametrize("swap", ["exchange", "fallback"])
@pytest.mark.parametrize(
    ("kind", "stage"), [(k, s) for k, stages in STAGES.items() for s in stages]
)
def test_a_failed_re_save_leaves_the_old_checkpoint_for_both_kinds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, stage: str, swap: str
) -> None:
    if swap == "fallback":
        monkeypatch.setattr(transaction, "_exchange", lambda root, a, b: False)
        if kind == "file":  # and no hard links: the old file is moved aside

            def no_link(*args: object, **kwargs: object) -> None:
                raise OSError(errno.EPERM, "hard links not supported (injected)")

            monkeypatch.setattr(os, "link", no_link)
    root = tmp_path / "run"
    hook = Failing()
    storage = LocalStorage(root, faults=hook)
    name = "step-00000001" if kind == "directory" else "w.h5"
    with safepoint.CheckpointManager(storage, name="step-{step:08d}") as mgr:
        _save(mgr, kind, 1.0)
        hook.fail = stage
        with pytest.raises(safepoint.StorageError) as info:
            _save(mgr, kind, 2.0)
        assert hook.fail is None, "the stage was never reached"
        assert info.value.stage == stage.partition(":")[0]
        assert [c.name for c in mgr.checkpoints()] == [name]
    assert _value(root, name) == 1.0
    assert sorted(os.listdir(root)) == sorted([name, "safepoint-log.jsonl"])


@pytest.mark.parametrize("swap", ["exchange", "fallback"])
@pytest.mark.parametrize("kind", ["directory", "file"])
def test_a_re_save_replaces_the_checkpoint_for_both_kinds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, swap: str
) -> None:
    if swap == "fallback":
        monkeypatch.setattr(transaction, "_exchange", lambda root, a, b: False)
    name = "step-00000001" if kind == "directory" else "w.h5"
    with safepoint.CheckpointManager(tmp_path) as mgr:
        _save(mgr, kind, 1.0)
        _save(mgr, kind, 2.0)
        assert [c.name for c in mgr.checkpoints()] == [name]
    assert _value(tmp_path, name) == 2.0
    assert sorted(os.listdir(tmp_path)) == sorted([name, "safepoint-log.jsonl"])


def test_the_transaction_calls_its_stages_in_the_documented_order(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    def recording(stage: str, target: str) -> None:
        seen.append((stage, target))

    storage = LocalStorage(tmp_path, faults=recording)
    entry = transaction.stage(storage.root, "x.h5", storage._fault)
    staged = os.path.join(storage.root, transaction.staged_file(entry, ".h5"))
    Path(staged).write_bytes(b"data")
    transaction.commit(storage.root, entry, "x.h5", "file", storage._fault, suffix=".h5")
    assert seen == [("stage", "x.h5"), ("fsync", "x.h5"), ("rename", "x.h5"), ("dir-fsync", "x.h5")]
    assert (tmp_path / "x.h5").read_bytes() == b"data"
    assert sorted(os.listdir(tmp_path)) == ["x.h5"]
