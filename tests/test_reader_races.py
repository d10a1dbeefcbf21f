"""Readers racing a writer that re-saves the same name (issue 10, item 8b).

A writer process commits version after version under one name: a checkpoint
directory swapped in by ``renameat2(RENAME_EXCHANGE)`` or by the two-rename fallback,
or a ``weights.best.h5`` replaced by ``os.replace``. Meanwhile this process restores
and verifies that name over and over. Every read must see one committed version
whole: never a ``CorruptCheckpointError`` for a healthy checkpoint, never tensors of
one version under the manifest of another.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint import cli
from safepoint.catalog import reader
from safepoint.storage.local import LocalStorage

# Real concurrency (a child process re-saving while readers read): the e2e set.
pytestmark = pytest.mark.e2e

SECONDS = 2.5
N = 8192  # int64s per tensor: two payload files of 64 KiB each

WRITER = r"""
import sys, time
import numpy as np
import safepoint
from safepoint.catalog import singlefile
from safepoint.storage import local as storage

root, mode, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "rename":  # a file system without RENAME_EXCHANGE (NFS, CIFS, FUSE)
    import safepoint.storage.commit as tx; tx._exchange = lambda root, a, b: False
mgr = safepoint.CheckpointManager(root, name="current", shard_bytes=N * 8)
version = 0
while True:
    version += 1
    if mode == "file":
        def write(path, v=version):
            import h5py
            with h5py.File(path, "w") as h5:
                h5["a"] = np.full(N, v, dtype=np.int64)
                h5["b"] = np.full(N, v, dtype=np.int64)
        mgr.save_file("weights.best.h5", write, step=version, epoch=None,
                        metrics={}, layout="test-races")
    else:
        state = {"a": np.full(N, version, dtype=np.int64),
                 "b": np.full(N, version, dtype=np.int64), "v": version}
        mgr.save(state, step=version)
    print(version, flush=True)
"""


def _start_writer(root: Path, mode: str) -> subprocess.Popen[bytes]:
    src = str(Path(safepoint.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), mode, str(N)], stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # one version committed before the readers start
    assert first.strip() == b"1", first
    return proc


def _whole(state: dict, step: int | None) -> int:
    """The one version ``state`` holds, checked against the manifest's step."""
    a, b = np.asarray(state["a"]), np.asarray(state["b"])
    version = int(a[0])
    assert (a == version).all() and (b == version).all(), "tensors of two versions mixed"
    assert step == version, f"manifest of version {step} with tensors of version {version}"
    if "v" in state:
        assert state["v"] == version
    return version


@pytest.mark.parametrize("mode", ["exchange", "rename", "file"])
def test_readers_see_one_whole_version_while_the_name_is_resaved(tmp_path: Path, mode: str) -> None:
    if mode == "file":
        pytest.importorskip("h5py")
    root = tmp_path / "run"
    name = "weights.best.h5" if mode == "file" else "current"
    writer = _start_writer(root, mode)
    mgr = safepoint.CheckpointManager(root)
    storage = LocalStorage(root)
    seen: set[int] = set()
    reads = gone = 0
    try:
        started = time.monotonic()

        def going() -> bool:  # a few seconds; longer on a busy machine, up to 15 s
            elapsed = time.monotonic() - started
            return elapsed < SECONDS or (elapsed < 15 and (reads < 10 or len(seen) < 3))

        while going():
            try:
                got = mgr.restore(checkpoint=name)
                seen.add(_whole(got.state, got.step))
                latest = mgr.restore()
                assert latest.name == name
                seen.add(_whole(latest.state, latest.step))
                found = reader.verify(storage, name)
                assert found.name == name
                if mode != "file":  # raw payloads, as convert and diff read them
                    found, raw = reader.read_raw(storage, name)
                    arrays = {k: v.view(np.int64) for k, v in raw.items()}
                    seen.add(_whole(arrays, found.step))
                for v in mgr.verify():
                    assert v.ok, v
                if reads % 10 == 0:
                    assert cli.main(["verify", str(root / name)]) == 0
                reads += 1
            except safepoint.CheckpointNotFoundError:
                # Only the two-rename fallback leaves a moment with no entry by that
                # name (between its renames); it is absent then, never corrupt.
                assert mode == "rename"
                gone += 1
    finally:
        writer.kill()
        writer.wait()
        assert writer.stdout is not None
        writer.stdout.close()
    assert reads >= 10 and len(seen) >= 3, (reads, sorted(seen), gone)
