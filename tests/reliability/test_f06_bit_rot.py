"""Family 6: bit rot in real payload files (and manifests), in both payload formats.

Each case copies a root with two sound checkpoints and damages the newer one: a bit
flipped in the header or in the tensor data, the last byte truncated, a 4 KiB page
zeroed, a byte appended, a bit flipped in the manifest. Then:

* ``verify()`` reports ``CorruptCheckpointError(file, expected, actual)`` naming it;
* restoring it by name raises that error;
* ``restore()`` (latest) falls back to the older checkpoint, bit-exact, and logs why.

Every damaged file must be detected: the test counts detected out of made.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from faultkit import digest, expected_digest, make_state, rng_for

import safepoint

SEED = 13
NBYTES = 96 << 10
DAMAGE = ("flip-header", "flip-data", "truncate-1", "zero-page", "append-1", "flip-manifest")


@pytest.fixture(scope="module", params=["safetensors", "hdf5"])
def template(request, tmp_path_factory):
    if request.param == "hdf5":
        pytest.importorskip("h5py")
    root = tmp_path_factory.mktemp(f"rot-{request.param}") / "run"
    mgr = safepoint.CheckpointManager(root, format=request.param, shard_bytes=40 << 10)
    for step in (1, 2):
        mgr.save(make_state(SEED, step, NBYTES), step=step)
    mgr.close()
    return request.param, root


def _damage(path: str, how: str, rng) -> None:
    data = bytearray(Path(path).read_bytes())
    if how in ("flip-header", "flip-manifest"):
        i = rng.randrange(0, min(len(data), 512))
        data[i] ^= 1 << rng.randrange(8)
    elif how == "flip-data":
        i = rng.randrange(len(data) // 2, len(data))
        data[i] ^= 1 << rng.randrange(8)
    elif how == "truncate-1":
        data = data[:-1]
    elif how == "zero-page":
        pages = [p for p in range(0, len(data) - 4096, 4096) if any(data[p : p + 4096])]
        p = rng.choice(pages)
        data[p : p + 4096] = bytes(4096)
    elif how == "append-1":
        data += b"\0"
    Path(path).write_bytes(bytes(data))


def test_every_damaged_file_is_detected(template, tmp_path, request, caplog):
    fmt, pristine = template
    rng = rng_for(request.node.name)
    made = detected = 0
    for case in range(60):
        how = DAMAGE[case % len(DAMAGE)]
        root = tmp_path / f"case-{case}"
        shutil.copytree(pristine, root)
        ckpt = root / "step-00000002"
        payloads = sorted(n for n in os.listdir(ckpt) if n != "manifest.json")
        fname = "manifest.json" if how == "flip-manifest" else rng.choice(payloads)
        _damage(str(ckpt / fname), how, rng)
        made += 1
        mgr = safepoint.CheckpointManager(root)
        results = {v.name: v.error for v in mgr.verify()}
        assert results["step-00000001"] is None
        err = results["step-00000002"]
        assert isinstance(err, safepoint.CorruptCheckpointError), (how, fname, err)
        assert err.file and fname in err.file, (how, fname, err.file)
        if how != "flip-manifest":
            assert err.expected is not None and err.actual is not None, (how, err)
            assert err.expected != err.actual
            with pytest.raises(safepoint.CorruptCheckpointError):
                mgr.restore(checkpoint="step-00000002")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="safepoint"):
            got = mgr.restore()
        assert got.step == 1 and digest(got.state) == expected_digest(SEED, 1, NBYTES)
        assert "step-00000002" in caplog.text, caplog.text
        detected += 1
    print(f"\n[{fmt}] corrupted files detected: {detected} of {made}")
    assert detected == made


def test_rot_in_every_checkpoint_is_reported(template, tmp_path, capsys):
    _, pristine = template
    root = tmp_path / "run"
    shutil.copytree(pristine, root)
    for name in ("step-00000001", "step-00000002"):
        payload = sorted(n for n in os.listdir(root / name) if n != "manifest.json")[0]
        _damage(str(root / name / payload), "flip-data", rng_for(name))
    mgr = safepoint.CheckpointManager(root)
    with pytest.raises(safepoint.CorruptCheckpointError) as info:
        mgr.restore()
    assert "No checkpoint" in str(info.value) and "verifies" in str(info.value)
    from safepoint.cli import main as cli

    assert cli(["verify", str(root)]) == safepoint.CorruptCheckpointError.exit_code
    assert "0 of 2 checkpoints verified." in capsys.readouterr().out
