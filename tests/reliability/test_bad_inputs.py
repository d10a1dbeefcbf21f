"""The bad-input table of RELIABILITY.md: each hostile or mistaken input gets its error.

Tampered manifests are re-signed (their self-checksum recomputed) and tampered
payloads get their size and checksum updated in the manifest, so that the deeper
validation is what must refuse them, not the checksum. Allocation-sensitive rows
(shape bombs) also check that nothing large was allocated.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import xxhash

import safepoint
from safepoint.ondisk.manifest import _body_digest

STATE = {
    "model": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4)},
    "step": 1,
}


@pytest.fixture
def ckpt(tmp_path) -> Path:
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    mgr.save(STATE, step=1)
    mgr.close()
    return root / "step-00000001"


def _body(ckpt: Path) -> dict:
    return json.loads((ckpt / "manifest.json").read_text())


def _sign(ckpt: Path, body: dict) -> None:
    body["checksum"] = _body_digest(body)
    (ckpt / "manifest.json").write_text(json.dumps(body))


def _edit(ckpt: Path, fn) -> None:
    body = _body(ckpt)
    fn(body)
    _sign(ckpt, body)


def _repayload(ckpt: Path, fname: str, data: bytes) -> None:
    """Replace a payload file and make the manifest vouch for the new bytes."""
    (ckpt / fname).write_bytes(data)
    body = _body(ckpt)
    body["files"][fname] = {"size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}
    _sign(ckpt, body)


def _restore(ckpt: Path):
    return safepoint.CheckpointManager(ckpt.parent).restore(checkpoint=ckpt.name)


# -------------------------------------------------------------- names and templates
BAD_NAMES = ["../escape", "a/b", "nul\x00byte", "/abs/path", "x" * 256, ".hidden", ".."]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_bad_name_template_or_field_is_config_error(tmp_path, bad):
    with pytest.raises(safepoint.ConfigError):
        safepoint.CheckpointManager(tmp_path / "r", name=bad.replace("{", "")).save(STATE, step=1)
    mgr = safepoint.CheckpointManager(tmp_path / "r2", name="{tag}")
    with pytest.raises(safepoint.ConfigError):
        mgr.save(STATE, step=1, metrics={"tag": bad})
    with pytest.raises(safepoint.ConfigError):
        mgr.restore(checkpoint=bad)
    assert not (tmp_path / "r2").exists() or os.listdir(tmp_path / "r2") == []


def test_config_errors_name_the_argument(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path / "r", name="w-{epoch:02d}-{val_acc:.2f}")
    with pytest.raises(safepoint.ConfigError, match="val_acc"):
        mgr.save(STATE, step=1, epoch=1, metrics={"loss": 0.1})
    with pytest.raises(safepoint.ConfigError, match="mode"):
        safepoint.CheckpointManager(tmp_path / "r", monitor="loss", mode="sideways")
    for freq in (0, -3, "sometimes", 1.5):
        with pytest.raises(safepoint.ConfigError, match="save_freq"):
            safepoint.ModelCheckpoint(tmp_path / "r", state=STATE, save_freq=freq)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- manifests
def test_directory_without_manifest(ckpt):
    (ckpt / "manifest.json").unlink()
    with pytest.raises(safepoint.IncompleteCheckpointError):
        _restore(ckpt)


@pytest.mark.parametrize(
    "text",
    [b"", b"{", b'{"format": "safepoint"', b"\xff\xfe", b"[]", b"null", b"{}" * 10],
    ids=["empty", "open-brace", "truncated", "not-utf8", "array", "null", "garbage"],
)
def test_truncated_or_invalid_manifest(ckpt, text):
    (ckpt / "manifest.json").write_bytes(text)
    with pytest.raises((safepoint.CorruptCheckpointError, safepoint.IncompatibleCheckpointError)):
        _restore(ckpt)


def test_manifest_with_nan_size_and_duplicate_keys(ckpt):
    text = (ckpt / "manifest.json").read_text()
    nan = text.replace('"size": ', '"size": NaN, "was": ', 1)
    (ckpt / "manifest.json").write_text(nan)
    with pytest.raises(safepoint.CorruptCheckpointError):
        _restore(ckpt)
    dup = text.replace('"seq": 1,', '"seq": 1, "seq": 2,', 1)
    (ckpt / "manifest.json").write_text(dup)
    with pytest.raises(safepoint.CorruptCheckpointError, match="duplicate"):
        _restore(ckpt)


def _set_size(value):
    def edit(body):
        next(iter(body["files"].values()))["size"] = value

    return edit


MANIFEST_EDITS = {
    "negative-size": _set_size(-1),
    "float-size": _set_size(1.5),
    "bool-size": _set_size(True),
    "huge-size": _set_size(2**70),
    "negative-seq": lambda b: b.update(seq=-4),
    "dtype-object": lambda b: b["tensors"]["model/w"].update(dtype="object"),
    "dtype-string": lambda b: b["tensors"]["model/w"].update(dtype="<U8"),
    "dtype-void": lambda b: b["tensors"]["model/w"].update(dtype="V16"),
    "shape-bomb": lambda b: b["tensors"]["model/w"].update(shape=[2**40, 2**40]),
    "shape-negative": lambda b: b["tensors"]["model/w"].update(shape=[-3, -4]),
    "shape-too-many-dims": lambda b: b["tensors"]["model/w"].update(shape=[1] * 65),
    "file-absolute": lambda b: b["tensors"]["model/w"].update(file="/etc/passwd"),
    "file-dotdot": lambda b: b["files"].update({"../../x": {"size": 1, "xxh3_64": "0" * 16}}),
    "file-slash": lambda b: b["files"].update({"a/b": {"size": 1, "xxh3_64": "0" * 16}}),
    "unknown-tensor-ref": lambda b: b["tree"].update(x={"$tensor": "nope"}),
    "unknown-tag": lambda b: b["tree"].update(x={"$pickle": "cos\nsystem\n"}),
    "deep-nesting": lambda b: b["tree"].update(x=json.loads("[" * 900 + "]" * 900)),
    "name-traversal": lambda b: b.update(name="../../etc"),
    "payload-unknown": lambda b: b.update(payload="pickle"),
}


@pytest.mark.parametrize("name", sorted(MANIFEST_EDITS))
def test_tampered_manifest_is_refused(ckpt, name):
    _edit(ckpt, MANIFEST_EDITS[name])
    tracemalloc.start()
    try:
        with pytest.raises(safepoint.CorruptCheckpointError):
            _restore(ckpt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{name}: {peak} bytes allocated while refusing it"


def test_newer_format_version_is_incompatible(ckpt):
    _edit(ckpt, lambda b: b.update(format_version=99))
    with pytest.raises(safepoint.IncompatibleCheckpointError, match="Upgrade"):
        _restore(ckpt)


# ------------------------------------------------------------------------ payloads
def _header(ckpt: Path) -> tuple[dict, bytes]:
    data = (ckpt / "model-00000.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header: dict, rest: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + rest


def _offsets(fn):
    def edit(header):
        fn(header["model/w"]["data_offsets"], header["model/b"]["data_offsets"])

    return edit


PAYLOAD_EDITS = {
    "negative-offset": _offsets(lambda w, b: w.__setitem__(0, -8)),
    "overlapping-offsets": _offsets(lambda w, b: b.__setitem__(0, b[0] - 8)),
    "offsets-past-end": _offsets(lambda w, b: b.__setitem__(1, b[1] + 4096)),
    "dtype-outside-allow-list": lambda h: h["model/w"].update(dtype="STR"),
    "shape-bomb": lambda h: h["model/w"].update(shape=[2**31, 2**31]),
    "header-not-object": lambda h: h.clear() or h.update({"model/w": [1, 2]}),
}


@pytest.mark.parametrize("name", sorted(PAYLOAD_EDITS))
def test_tampered_payload_is_refused(ckpt, name):
    header, rest = _header(ckpt)
    PAYLOAD_EDITS[name](header)
    _repayload(ckpt, "model-00000.safetensors", _with_header(header, rest))
    tracemalloc.start()
    try:
        with pytest.raises(safepoint.CorruptCheckpointError):
            _restore(ckpt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_header_length_bomb(ckpt):
    data = (ckpt / "model-00000.safetensors").read_bytes()
    _repayload(ckpt, "model-00000.safetensors", struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(safepoint.CorruptCheckpointError):
        _restore(ckpt)


@pytest.mark.parametrize("how", ["missing", "wrong-size", "wrong-checksum"])
def test_payload_missing_wrong_size_or_checksum(ckpt, how):
    payload = ckpt / "model-00000.safetensors"
    if how == "missing":
        payload.unlink()
    elif how == "wrong-size":
        payload.write_bytes(payload.read_bytes() + b"\0")
    else:
        data = bytearray(payload.read_bytes())
        data[-1] ^= 1
        payload.write_bytes(bytes(data))
    with pytest.raises(safepoint.CorruptCheckpointError) as info:
        _restore(ckpt)
    err = info.value
    assert err.file and "model-00000.safetensors" in err.file
    if how != "missing":
        assert err.expected is not None and err.actual is not None
        assert err.expected != err.actual


def test_payload_symlink_out_of_the_root(ckpt, tmp_path):
    payload = ckpt / "model-00000.safetensors"
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(payload.read_bytes())  # identical bytes: only the link is wrong
    payload.unlink()
    payload.symlink_to(outside)
    with pytest.raises(safepoint.CorruptCheckpointError, match="link"):
        _restore(ckpt)
    ckpt.rename(tmp_path / "real")
    ckpt.symlink_to(tmp_path / "real")  # the checkpoint directory itself is a link
    with pytest.raises(safepoint.SafepointError):
        _restore(ckpt)


class _Boom:
    """Unpickling this creates a marker file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_file_is_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    boom = _Boom()
    boom.marker = str(marker)
    root = tmp_path / "run"
    root.mkdir()
    for name in ("model.pt", "model.ckpt", "pytorch_model.bin"):
        (root / name).write_bytes(pickle.dumps({"w": boom}))
        with pytest.raises(safepoint.SafepointError) as info:
            safepoint.load(root / name)
        assert "pickle" in str(info.value) or "convert" in str(info.value)
        with pytest.raises(safepoint.SafepointError):
            safepoint.CheckpointManager(root).restore(checkpoint=name)
    assert not marker.exists()
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2)}, root / "real.pt")
    with pytest.raises(safepoint.SafepointError):
        safepoint.load(root / "real.pt")


# ---------------------------------------------------------------------------- HDF5
@pytest.fixture
def h5ckpt(tmp_path) -> Path:
    pytest.importorskip("h5py")
    root = tmp_path / "h5run"
    mgr = safepoint.CheckpointManager(root, format="hdf5")
    mgr.save(STATE, step=1)
    mgr.close()
    return root / "step-00000001"


def _rewrite_h5(ckpt: Path, fn) -> None:
    import h5py

    path = ckpt / "model-00000.h5"
    with h5py.File(path, "a") as h5:
        fn(h5, ckpt)
    _repayload(ckpt, "model-00000.h5", path.read_bytes())


def _dataset_of(ckpt: Path) -> str:
    return _body(ckpt)["tensors"]["model/w"]["name"]


def _external_link(h5, ckpt):
    import h5py

    name = _dataset_of(ckpt)
    other = ckpt.parent.parent / "other.h5"
    with h5py.File(other, "w") as o:
        o["d"] = np.zeros((3, 4), np.float32)
    del h5[name]
    h5[name] = h5py.ExternalLink(str(other), "d")


def _external_storage(h5, ckpt):
    name = _dataset_of(ckpt)
    raw = ckpt.parent.parent / "raw.bin"
    raw.write_bytes(bytes(48))
    del h5[name]
    h5.create_dataset(name, shape=(3, 4), dtype=np.float32, external=[(str(raw), 0, 48)])


def _virtual(h5, ckpt):
    import h5py

    name = _dataset_of(ckpt)
    h5["src"] = np.zeros((3, 4), np.float32)
    layout = h5py.VirtualLayout(shape=(3, 4), dtype=np.float32)
    layout[:] = h5py.VirtualSource(h5["src"])
    del h5[name]
    h5.create_virtual_dataset(name, layout)


def _soft_link(h5, ckpt):
    import h5py

    name = _dataset_of(ckpt)
    h5["elsewhere"] = h5[name][()]
    del h5[name]
    h5[name] = h5py.SoftLink("/elsewhere")


@pytest.mark.parametrize("edit", [_external_link, _external_storage, _virtual, _soft_link])
def test_hdf5_links_external_and_virtual_storage_are_refused(h5ckpt, edit):
    _rewrite_h5(h5ckpt, edit)
    with pytest.raises(safepoint.CorruptCheckpointError):
        _restore(h5ckpt)


# ----------------------------------------------------------------- restoring into
def test_restore_into_mismatched_state_lists_keys(ckpt):
    mgr = safepoint.CheckpointManager(ckpt.parent)
    target = {"model": {"w": np.zeros((4, 3), np.float32), "b": np.ones(4)}, "extra": 1}
    with pytest.raises(safepoint.StateMismatchError) as info:
        mgr.restore(target)
    assert "extra" in info.value.missing
    torch = pytest.importorskip("torch")
    saved = torch.nn.Linear(3, 2)
    root = ckpt.parent.parent / "torch"
    m = safepoint.CheckpointManager(root)
    m.save({"model": saved}, step=1)
    m.close()
    with pytest.raises(safepoint.StateMismatchError) as info:
        safepoint.CheckpointManager(root).restore({"model": torch.nn.Linear(4, 2)})
    assert any("weight" in k for k in info.value.mismatched), info.value
    with pytest.raises(safepoint.StateMismatchError) as info:
        safepoint.CheckpointManager(root).restore({"model": torch.nn.Bilinear(3, 3, 2)})
    assert info.value.missing or info.value.unexpected or info.value.mismatched


# ---------------------------------------------------------------------- roots
def test_save_to_a_root_that_is_a_file_or_vanished(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(safepoint.StorageError) as info:
        safepoint.CheckpointManager(tmp_path / "file").save(STATE, step=1)
    assert info.value.errno is not None
    root = tmp_path / "gone" / "run"
    mgr = safepoint.CheckpointManager(root)
    mgr.save(STATE, step=1)
    mgr.close()
    (tmp_path / "gone" / "run").rename(tmp_path / "elsewhere")
    (tmp_path / "gone").rmdir()
    (tmp_path / "gone").write_text("now a file")  # the root's parent vanished into a file
    with pytest.raises(safepoint.StorageError) as info:
        safepoint.CheckpointManager(root).save(STATE, step=2)
    assert info.value.errno is not None


def test_restore_from_an_empty_root(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path / "empty")
    with pytest.raises(safepoint.CheckpointNotFoundError):
        mgr.restore()
    assert mgr.restore(missing_ok=True) is None
    assert not (tmp_path / "empty").exists()
