"""Corrupted checkpoints (torn files, flipped bits, bit rot) are detected, never loaded as data.

Damaged checkpoints: every kind of damage is caught, named, and skipped by "latest".

Each case saves three good checkpoints, damages the newest, and checks that (a)
restoring it by name raises the documented error naming the file, (b) ``restore()``
falls back to the previous checkpoint and logs why, and (c) ``verify()`` reports it.

Family 6: bit rot in real payload files (and manifests), in both payload formats.

Each case copies a root with two sound checkpoints and damages the newer one: a bit
flipped in the header or in the tensor data, the last byte truncated, a 4 KiB page
zeroed, a byte appended, a bit flipped in the manifest. Then:

* ``verify()`` reports ``CorruptCheckpointError(file, expected, actual)`` naming it;
* restoring it by name raises that error;
* ``restore()`` (latest) falls back to the older checkpoint, bit-exact, and logs why.

Every damaged file must be detected: the test counts detected out of made.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from faultkit import digest, expected_digest, make_state, rng_for

import safepoint
from safepoint_testing import read_manifest, write_manifest

Damage = Callable[[Path], None]


def payload(ckpt: Path) -> Path:
    (found,) = ckpt.glob("model-*.safetensors")
    return found


def flip_byte(offset: int) -> Damage:
    def damage(ckpt: Path) -> None:
        p = payload(ckpt)
        data = bytearray(p.read_bytes())
        data[offset % len(data)] ^= 0x01
        p.write_bytes(bytes(data))

    return damage


def truncate(ckpt: Path) -> None:
    p = payload(ckpt)
    p.write_bytes(p.read_bytes()[:-1])


def extend(ckpt: Path) -> None:
    with open(payload(ckpt), "ab") as f:
        f.write(b"\0")


def zero_page(ckpt: Path) -> None:
    p = payload(ckpt)
    data = bytearray(p.read_bytes())
    data[-4096:] = bytes(4096)
    p.write_bytes(bytes(data))


def delete_payload(ckpt: Path) -> None:
    payload(ckpt).unlink()


def garble_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").write_bytes(b"\x00\xffnot json{")


def truncate_manifest(ckpt: Path) -> None:
    m = ckpt / "manifest.json"
    m.write_bytes(m.read_bytes()[: len(m.read_bytes()) // 2])


def empty_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").write_bytes(b"")


def edit_number_unsigned(ckpt: Path) -> None:
    """Change a digit in the manifest without re-signing it (bit rot in the record)."""
    m = ckpt / "manifest.json"
    text = m.read_text()
    match = re.search(r'"size": (\d+)', text)
    assert match
    text = text[: match.start(1)] + str(int(match.group(1)) + 1) + text[match.end(1) :]
    m.write_text(text)


def edit_shape_unsigned(ckpt: Path) -> None:
    body = read_manifest(ckpt)
    body["tensors"]["w"]["shape"] = [4096, 2]
    write_manifest(ckpt, body, sign=False)


def edit_size_signed(ckpt: Path) -> None:
    body = read_manifest(ckpt)
    (fname,) = body["files"]
    body["files"][fname]["size"] += 8
    write_manifest(ckpt, body)


def edit_digest_signed(ckpt: Path) -> None:
    body = read_manifest(ckpt)
    (fname,) = body["files"]
    body["files"][fname]["xxh3_64"] = "0" * 16
    write_manifest(ckpt, body)


CORRUPT_CASES: dict[str, tuple[Damage, str]] = {
    "flip-header-byte": (flip_byte(20), "model-00000.safetensors"),
    "flip-data-byte": (flip_byte(-3), "model-00000.safetensors"),
    "truncate": (truncate, "model-00000.safetensors"),
    "extend": (extend, "model-00000.safetensors"),
    "zero-page": (zero_page, "model-00000.safetensors"),
    "delete-payload": (delete_payload, "model-00000.safetensors"),
    "garble-manifest": (garble_manifest, "manifest.json"),
    "truncate-manifest": (truncate_manifest, "manifest.json"),
    "empty-manifest": (empty_manifest, "manifest.json"),
    "edit-number": (edit_number_unsigned, "manifest.json"),
    "edit-shape": (edit_shape_unsigned, "manifest.json"),
    "edit-size-resigned": (edit_size_signed, "model-00000.safetensors"),
    "edit-digest-resigned": (edit_digest_signed, "model-00000.safetensors"),
}


def three_checkpoints(root: Path) -> safepoint.CheckpointManager:
    mgr = safepoint.CheckpointManager(root)
    for step in (1, 2, 3):
        mgr.save({"w": np.full((2048, 2), step, dtype=np.float32), "step": step}, step=step)
    return mgr


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_damage_is_detected_and_latest_falls_back(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    damage, bad_file = CORRUPT_CASES[case]
    root = tmp_path / "run"
    mgr = three_checkpoints(root)
    damage(root / "step-00000003")

    with pytest.raises(safepoint.CorruptCheckpointError) as info:
        mgr.restore(checkpoint="step-00000003")
    assert bad_file in str(info.value)
    assert info.value.file is not None and bad_file in info.value.file
    with pytest.raises(safepoint.CorruptCheckpointError):
        safepoint.load(root / "step-00000003")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        ckpt = mgr.restore()
    assert ckpt is not None and ckpt.step == 2 and ckpt.state["step"] == 2
    assert float(ckpt.state["w"][0, 0]) == 2.0
    assert any("step-00000003" in r.getMessage() for r in caplog.records), caplog.text

    report = {v.name: v for v in mgr.verify()}
    assert report["step-00000001"].ok and report["step-00000002"].ok
    bad = report["step-00000003"]
    assert not bad.ok and isinstance(bad.error, safepoint.CorruptCheckpointError)
    assert bad_file in str(bad.error)
    mgr.close()


def test_missing_manifest_is_incomplete(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "run"
    mgr = three_checkpoints(root)
    (root / "step-00000003" / "manifest.json").unlink()
    with pytest.raises(safepoint.IncompleteCheckpointError, match=r"manifest\.json"):
        mgr.restore(checkpoint="step-00000003")
    assert [c.step for c in mgr.checkpoints()] == [1, 2]  # never listed
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        ckpt = mgr.restore()
    assert ckpt is not None and ckpt.step == 2
    report = {v.name: v for v in mgr.verify()}
    assert isinstance(report["step-00000003"].error, safepoint.IncompleteCheckpointError)
    mgr.close()


def test_verify_reports_each_bad_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = three_checkpoints(root)
    truncate(root / "step-00000001")
    garble_manifest(root / "step-00000002")
    report = mgr.verify()
    assert [(v.name, v.ok) for v in report] == [
        ("step-00000001", False),
        ("step-00000002", False),
        ("step-00000003", True),
    ]
    assert "model-00000.safetensors" in str(report[0].error)
    assert "manifest.json" in str(report[1].error)
    mgr.close()


def test_all_bad_means_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = three_checkpoints(root)
    for step in (1, 2, 3):
        flip_byte(-1)(root / f"step-0000000{step}")
    with pytest.raises(safepoint.CorruptCheckpointError, match=r"No checkpoint .* verifies"):
        mgr.restore()
    mgr.close()


def test_corruption_error_carries_expected_and_actual(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = three_checkpoints(root)
    truncate(root / "step-00000003")
    size = json.loads((root / "step-00000003" / "manifest.json").read_text())["files"][
        "model-00000.safetensors"
    ]["size"]
    with pytest.raises(safepoint.CorruptCheckpointError) as info:
        mgr.restore(checkpoint=3)
    assert (info.value.expected, info.value.actual) == (size, size - 1)
    mgr.close()


def test_hdf5_damage_is_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("h5py")
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root, format="hdf5") as mgr:
        for step in (1, 2):
            mgr.save({"w": np.full(512, step, dtype=np.float64)}, step=step)
        p = root / "step-00000002" / "model-00000.h5"
        data = bytearray(p.read_bytes())
        data[-10] ^= 0xFF
        p.write_bytes(bytes(data))
        with pytest.raises(safepoint.CorruptCheckpointError, match=r"model-00000\.h5"):
            mgr.restore(checkpoint=2)
        with caplog.at_level(logging.WARNING, logger="safepoint"):
            ckpt = mgr.restore()
        assert ckpt is not None and ckpt.step == 1


@pytest.mark.parametrize("damage", [garble_manifest, truncate_manifest, empty_manifest])
def test_unreadable_manifests_are_not_an_empty_root(
    tmp_path: Path, damage: Damage, caplog: pytest.LogCaptureFixture
) -> None:
    """When every checkpoint's manifest is damaged, restore must not report "nothing to
    resume" (missing_ok=True would silently restart training from scratch)."""
    root = tmp_path / "run"
    mgr = three_checkpoints(root)
    for step in (1, 2, 3):
        damage(root / f"step-0000000{step}")
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        with pytest.raises(safepoint.CorruptCheckpointError, match="step-00000003"):
            mgr.restore()
        with pytest.raises(safepoint.CorruptCheckpointError):
            mgr.restore(missing_ok=True)
    mgr.close()


def test_only_foreign_directories_still_mean_empty(tmp_path: Path) -> None:
    """Other tools' directories (no manifest.json) in the root are not checkpoints."""
    root = tmp_path / "run"
    (root / "tensorboard").mkdir(parents=True)
    mgr = safepoint.CheckpointManager(root)
    assert mgr.restore(missing_ok=True) is None
    with pytest.raises(safepoint.CheckpointNotFoundError):
        mgr.restore()


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
