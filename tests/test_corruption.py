"""Damaged checkpoints: every kind of damage is caught, named, and skipped by "latest".

Each case saves three good checkpoints, damages the newest, and checks that (a)
restoring it by name raises the documented error naming the file, (b) ``restore()``
falls back to the previous checkpoint and logs why, and (c) ``verify()`` reports it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

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
