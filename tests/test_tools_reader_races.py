"""``safepoint diff`` and ``safepoint convert`` racing a writer that re-saves one name.

The same writer process as in ``test_reader_races`` commits version after version
under one name. ``diff`` and ``convert`` must each read one committed version whole:
a manifest read first and payloads opened by path afterwards would meet the next
version's files (reported as corruption) or mix two versions.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import safepoint
import test_reader_races as races
from safepoint import cli
from safepoint.catalog import reader
from safepoint.cli import report
from safepoint.cli.conversion import convert
from safepoint.storage.local import LocalStorage

# Real concurrency (threads or a child process racing a writer): the e2e set.
pytestmark = pytest.mark.e2e

SECONDS = 2.0


def _reference(tmp_path: Path, mode: str) -> tuple[LocalStorage, str]:
    """A checkpoint of version 0 (every value 0, step 0) to diff the racing name against."""
    ref = tmp_path / "ref"
    if mode == "file":

        def write(path: str) -> None:
            import h5py

            with h5py.File(path, "w") as h5:
                h5["a"] = np.zeros(races.N, dtype=np.int64)
                h5["b"] = np.zeros(races.N, dtype=np.int64)

        mgr = safepoint.CheckpointManager(ref)
        mgr.save_file("zero.h5", write, step=0, epoch=None, metrics={}, layout="test-races")
        return LocalStorage(ref), "zero.h5"
    mgr = safepoint.CheckpointManager(ref, name="zero")
    zeros = {k: np.zeros(races.N, dtype=np.int64) for k in "ab"}
    mgr.save({**zeros, "v": 0}, step=0)
    return LocalStorage(ref), "zero"


def _version_of(changes: list[report.Change]) -> int:
    """The one version a diff against version 0 shows, checked across tensors and step."""
    by_key = {(c.kind, c.key): c for c in changes}
    a, b = by_key[("tensor", "a")], by_key[("tensor", "b")]
    assert a.change == b.change == "values", changes
    assert a.changed == b.changed == races.N, changes
    version = int(a.max_abs_diff or 0)
    assert b.max_abs_diff == version, f"tensors of two versions mixed: {changes}"
    step = by_key[("step", "step/epoch")]
    assert str(step.b).split("/")[0] == str(version), f"manifest of another version: {changes}"
    return version


@pytest.mark.parametrize("mode", ["exchange", "rename", "file"])
def test_diff_and_convert_read_one_whole_version_while_the_name_is_resaved(
    tmp_path: Path, mode: str
) -> None:
    if mode == "file":
        pytest.importorskip("h5py")
    root = tmp_path / "run"
    name = "weights.best.h5" if mode == "file" else "current"
    ref_storage, ref_name = _reference(tmp_path, mode)
    writer = races._start_writer(root, mode)
    storage = LocalStorage(root)
    copies = tmp_path / "copies"
    seen: set[int] = set()
    reads = gone = 0
    try:
        started = time.monotonic()

        def going() -> bool:  # a few seconds; longer on a busy machine, up to 15 s
            elapsed = time.monotonic() - started
            return elapsed < SECONDS or (elapsed < 15 and (reads < 6 or len(seen) < 3))

        while going():
            try:
                seen.add(_version_of(report.diff(ref_storage, ref_name, storage, name)))
                copy = f"copy-{reads}"
                convert(str(root / name), str(copies / copy), to="safetensors")
                found, got = reader.read_checkpoint(LocalStorage(copies), copy, as_numpy=True)
                seen.add(races._whole(got, found.step))
                if reads % 3 == 0:
                    ref = str(Path(ref_storage.root) / ref_name)
                    assert cli.main(["diff", ref, str(root / name)]) == 1
                reads += 1
            except safepoint.CheckpointNotFoundError:
                # Only the two-rename fallback has a moment with no entry by that name.
                assert mode == "rename"
                gone += 1
    finally:
        writer.kill()
        writer.wait()
        assert writer.stdout is not None
        writer.stdout.close()
    assert reads >= 6 and len(seen) >= 3, (reads, sorted(seen), gone)
