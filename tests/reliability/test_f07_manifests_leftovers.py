"""Family 7: torn, missing and stale manifests; leftover staging and trash directories.

None of them is ever listed or loaded as a checkpoint; ``restore('latest')`` skips
them for the newest sound one; the next writer (or ``safepoint gc``) removes the
leftovers; and a new save under the same step works.
"""

from __future__ import annotations

import shutil

import pytest
from faultkit import Oracle, digest, expected_digest, leftovers, make_state

import safepoint
from safepoint.cli import main as cli

SEED = 19
NBYTES = 48 << 10


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    for step in (1, 2, 3):
        mgr.save(make_state(SEED, step, NBYTES), step=step)
    mgr.close()
    return root


def _torn(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _missing(path):
    path.unlink()


def _empty(path):
    path.write_bytes(b"")


def _stale(path):
    """The manifest of an older checkpoint left in this directory."""
    older = path.parent.parent / "step-00000002" / "manifest.json"
    shutil.copy(older, path)


@pytest.mark.parametrize("damage", [_torn, _missing, _empty, _stale])
def test_bad_manifest_is_never_loaded(root, damage):
    damage(root / "step-00000003" / "manifest.json")
    mgr = safepoint.CheckpointManager(root)
    listed = [c.name for c in mgr.checkpoints()]
    got = mgr.restore()
    if damage is _stale:
        # It describes step 2's payload, not the bytes in this directory. Listing reads
        # manifests only (it lists the directory under the stale step), but the
        # checksums refuse it, so restore falls back rather than load a mixture.
        assert got.step == 2 and got.name == "step-00000002"
        assert not {v.name: v.ok for v in mgr.verify()}["step-00000003"]
    else:
        assert "step-00000003" not in listed
        assert got.step == 2
    assert digest(got.state) == expected_digest(SEED, 2, NBYTES)
    expected = (
        safepoint.IncompleteCheckpointError if damage is _missing else safepoint.SafepointError
    )
    with pytest.raises(expected):
        mgr.restore(checkpoint="step-00000003")
    # A new save with the same step replaces the broken directory and becomes latest.
    mgr.save(make_state(SEED, 3, NBYTES), step=3)
    mgr.close()
    Oracle(SEED, NBYTES, returned=3).check(root)


def test_leftover_staging_and_trash_are_cleaned(root, capsys):
    staged = root / "step-00000004.tmp-1234abcd"
    shutil.copytree(root / "step-00000003", staged)  # even a complete-looking one
    (root / ".trash-step-00000001-deadbeef").mkdir()
    (root / ".trash-step-00000001-deadbeef" / "manifest.json").write_text("{}")
    (root / "step-00000009.tmp-00000000").mkdir()  # an empty one
    mgr = safepoint.CheckpointManager(root)
    assert [c.step for c in mgr.checkpoints()] == [1, 2, 3]
    assert all(v.name.startswith("step-") and ".tmp-" not in v.name for v in mgr.verify())
    with pytest.raises(safepoint.ConfigError):
        mgr.restore(checkpoint="step-00000004.tmp-1234abcd")
    assert mgr.restore().step == 3
    assert cli(["gc", str(root)]) == 0
    assert "3 leftover" in capsys.readouterr().out
    assert leftovers(root) == []
    # And a writer cleans them by itself.
    staged.mkdir()
    mgr.save(make_state(SEED, 4, NBYTES), step=4)
    mgr.close()
    assert leftovers(root) == []
    Oracle(SEED, NBYTES, returned=4).check(root)


def test_directory_without_manifest_is_not_listed(root):
    (root / "step-00000007").mkdir()
    (root / "step-00000007" / "model-00000.safetensors").write_bytes(b"\0" * 64)
    mgr = safepoint.CheckpointManager(root)
    assert [c.step for c in mgr.checkpoints()] == [1, 2, 3]
    with pytest.raises(safepoint.IncompleteCheckpointError):
        mgr.restore(checkpoint="step-00000007")
    assert mgr.restore().step == 3
    bad = {v.name: v.error for v in mgr.verify() if not v.ok}
    assert isinstance(bad["step-00000007"], safepoint.IncompleteCheckpointError)
