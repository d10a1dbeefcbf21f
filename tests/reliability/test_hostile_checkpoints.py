"""Hostile or mistaken inputs: each row of the bad-input table gets its documented error.

Hostile checkpoints: RELIABILITY.md's bad-input table, row by row.

A checkpoint from the internet may be built to execute code, to read files outside
its directory, or to make the reader allocate terabytes. None of that may happen:
each case must end in the documented error. The manifest checksums itself, so cases
that target deeper validation re-sign the tampered manifest (and payload sizes and
digests) exactly as an attacker would.

The bad-input table of RELIABILITY.md: each hostile or mistaken input gets its error.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

import safepoint
from safepoint.ondisk.manifest import _body_digest
from safepoint_testing import read_manifest, write_manifest

PAYLOAD = "model-00000.safetensors"


class _Marker:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (os.mkdir, (str(self.path),))


def make_checkpoint(root: Path, **kwargs: Any) -> Path:
    with safepoint.CheckpointManager(root, **kwargs) as mgr:
        ckpt = mgr.save(
            {"w": np.arange(16, dtype=np.float32).reshape(4, 4), "b": np.ones(3)}, step=1
        )
    return Path(ckpt.path)


def resign_payload(ckpt: Path, fname: str = PAYLOAD, edit: Callable[[dict], None] | None = None):
    """Record ``fname``'s current size and digest in the manifest and re-sign it."""
    body = read_manifest(ckpt)
    data = (ckpt / fname).read_bytes()
    body["files"].setdefault(fname, {})
    body["files"][fname] = {"size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}
    if edit is not None:
        edit(body)
    write_manifest(ckpt, body)


def restore_by_name(ckpt: Path) -> Any:
    mgr = safepoint.CheckpointManager(ckpt.parent)
    return mgr.restore(checkpoint=ckpt.name)


# ----------------------------------------------------------------- pickles
def test_pickle_file_given_to_load_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"w": _Marker(marker)}))
    with pytest.raises(safepoint.SafepointError) as info:
        safepoint.load(evil)
    assert "pickle" in str(info.value).lower() or "torch.save" in str(info.value)
    assert not marker.exists()


def test_torch_save_file_given_to_load_is_refused_unexecuted(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2), "x": _Marker(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(safepoint.SafepointError):
        safepoint.load(evil)
    # a directory holding only the torch.save file is not a checkpoint either
    d = tmp_path / "ckpt"
    d.mkdir()
    os.rename(evil, d / "model.pt")
    with pytest.raises(safepoint.IncompleteCheckpointError):
        safepoint.load(d)
    with pytest.raises(safepoint.IncompleteCheckpointError):
        safepoint.CheckpointManager(tmp_path).restore(checkpoint="ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickle_as_payload_is_corrupt_and_never_unpickled(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    ckpt = make_checkpoint(tmp_path / "run")
    if kind == "pickle":
        (ckpt / PAYLOAD).write_bytes(pickle.dumps({"w": _Marker(marker)}))
    else:
        torch = pytest.importorskip("torch")
        torch.save({"w": _Marker(marker)}, ckpt / PAYLOAD)
    resign_payload(ckpt)  # sizes and checksums agree: only the format checks can refuse
    with pytest.raises(safepoint.CorruptCheckpointError, match=PAYLOAD):
        restore_by_name(ckpt)
    with pytest.raises(safepoint.CorruptCheckpointError):
        safepoint.load(ckpt)
    assert not marker.exists()


def test_pickle_as_manifest_is_corrupt(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = make_checkpoint(tmp_path / "run")
    (ckpt / "manifest.json").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(safepoint.CorruptCheckpointError, match="manifest"):
        restore_by_name(ckpt)
    assert not marker.exists()


# ----------------------------------------------------------------- paths out of the root
@pytest.mark.parametrize(
    "evil_name", ["/tmp/x.safetensors", "../outside.safetensors", "..", "a/b", "manifest.json"]
)
def test_manifest_file_paths_must_stay_inside(tmp_path: Path, evil_name: str) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    # a valid copy of the payload waits at the outside path: if it were read, the
    # restore would succeed, so a CorruptCheckpointError proves it was not used
    outside = (ckpt / evil_name) if not evil_name.startswith("/") else Path(evil_name)
    if evil_name not in ("..", "a/b", "manifest.json") and not evil_name.startswith("/"):
        outside.resolve().write_bytes((ckpt / PAYLOAD).read_bytes())

    def move(body: dict) -> None:
        info = body["files"].pop(PAYLOAD)
        body["files"][evil_name] = info
        for entry in body["tensors"].values():
            entry["file"] = evil_name

    body = read_manifest(ckpt)
    move(body)
    write_manifest(ckpt, body)
    with pytest.raises(safepoint.CorruptCheckpointError):
        restore_by_name(ckpt)
    with pytest.raises(safepoint.CorruptCheckpointError):
        safepoint.load(ckpt)
    report = safepoint.CheckpointManager(ckpt.parent).verify()
    assert not report[0].ok


def test_payload_symlink_out_of_root_is_refused(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    outside = tmp_path / "outside.safetensors"
    os.rename(ckpt / PAYLOAD, outside)  # a perfectly valid payload, just outside
    os.symlink(outside, ckpt / PAYLOAD)
    with pytest.raises(safepoint.CorruptCheckpointError, match="link"):
        restore_by_name(ckpt)
    with pytest.raises(safepoint.CorruptCheckpointError):
        safepoint.load(ckpt)
    assert not safepoint.CheckpointManager(ckpt.parent).verify()[0].ok
    # restore("latest") skips it rather than following the link
    with pytest.raises(safepoint.CorruptCheckpointError):
        safepoint.CheckpointManager(ckpt.parent).restore()


def test_manifest_symlink_and_checkpoint_dir_symlink_are_refused(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    elsewhere = make_checkpoint(tmp_path / "elsewhere")
    os.unlink(ckpt / "manifest.json")
    os.symlink(elsewhere / "manifest.json", ckpt / "manifest.json")
    with pytest.raises(safepoint.CorruptCheckpointError):
        restore_by_name(ckpt)
    # a checkpoint directory that is itself a link out of the root
    os.symlink(elsewhere, tmp_path / "run" / "step-00000002")
    mgr = safepoint.CheckpointManager(tmp_path / "run")
    assert [c.name for c in mgr.checkpoints()] == []
    with pytest.raises(safepoint.SafepointError):
        mgr.restore(checkpoint="step-00000002")


# ----------------------------------------------------------------- manifest numbers and shapes
def _set_size(value: Any) -> Callable[[dict], None]:
    def edit(body: dict) -> None:
        body["files"][PAYLOAD]["size"] = value

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _set_size(-1),
        _set_size(1.5),
        _set_size("100"),
        _set_size(None),
        _set_size(True),
        lambda b: b.update(seq=-3),
        lambda b: b.update(step="1"),
        lambda b: b.update(name="../escape"),
        lambda b: b.update(payload="pickle"),
        lambda b: b["tensors"]["w"].update(shape=[4, -4]),
        lambda b: b["tensors"]["w"].update(shape="4x4"),
        lambda b: b["tensors"]["w"].update(shape=[1] * 65),
        lambda b: b["tensors"]["w"].update(file="other.safetensors"),
        lambda b: b["tensors"]["w"].update(lib="pickle"),
        lambda b: b.update(tree={"w": {"$tensor": "nope"}}),
        lambda b: b.update(files=[]),
        lambda b: b["files"][PAYLOAD].update(xxh3_64="short"),
    ],
    ids=[
        "size-negative",
        "size-float",
        "size-str",
        "size-null",
        "size-bool",
        "seq-negative",
        "step-str",
        "name-dotdot",
        "payload-pickle",
        "shape-negative",
        "shape-str",
        "shape-65-dims",
        "unlisted-file",
        "lib",
        "unknown-tensor",
        "files-list",
        "digest",
    ],
)
def test_tampered_signed_manifest_is_corrupt(
    tmp_path: Path, tamper: Callable[..., None], edit: Callable[[dict], None]
) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    tamper(ckpt, edit)
    with pytest.raises(safepoint.CorruptCheckpointError):
        restore_by_name(ckpt)
    assert safepoint.CheckpointManager(ckpt.parent).checkpoints() == []  # never listed


def test_nan_size_in_manifest_text(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    text = (ckpt / "manifest.json").read_text()
    size = read_manifest(ckpt)["files"][PAYLOAD]["size"]
    (ckpt / "manifest.json").write_text(text.replace(f'"size": {size}', '"size": NaN'))
    with pytest.raises(safepoint.CorruptCheckpointError, match="manifest"):
        restore_by_name(ckpt)


def test_duplicate_manifest_keys(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    text = (ckpt / "manifest.json").read_text()
    (ckpt / "manifest.json").write_text(text.replace('"seq": 1,', '"seq": 1,\n "seq": 2,', 1))
    with pytest.raises(safepoint.CorruptCheckpointError, match="duplicate"):
        restore_by_name(ckpt)


def test_ten_thousand_deep_nesting(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    body = read_manifest(ckpt)
    body["tree"] = "@TREE@"
    text = json.dumps(body).replace('"@TREE@"', "[" * 10_000 + "]" * 10_000)
    (ckpt / "manifest.json").write_text(text)
    with pytest.raises(safepoint.CorruptCheckpointError):
        restore_by_name(ckpt)


def test_deep_but_parseable_nesting_signed(tmp_path: Path, tamper: Callable[..., None]) -> None:
    """Deep enough to be a bomb for the tree decoder, shallow enough for json to sign."""
    ckpt = make_checkpoint(tmp_path / "run")
    deep: Any = 1
    for _ in range(600):
        deep = [deep]
    tamper(ckpt, lambda b: b.update(tree={"x": deep}))
    with pytest.raises(safepoint.CorruptCheckpointError, match="nesting"):
        restore_by_name(ckpt)


def test_newer_format_version_is_incompatible(tmp_path: Path, tamper: Callable) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    tamper(ckpt, lambda b: b.update(format_version=99))
    with pytest.raises(safepoint.IncompatibleCheckpointError, match="99"):
        restore_by_name(ckpt)
    with pytest.raises(safepoint.IncompatibleCheckpointError):
        safepoint.load(ckpt)
    # restore("latest") skips it and says so; with nothing older it is an error
    with pytest.raises(safepoint.CorruptCheckpointError, match="99"):
        safepoint.CheckpointManager(ckpt.parent).restore()


@pytest.mark.parametrize("dtype", ["object", "str", "<U3", "void", "V8", "datetime64", "O"])
def test_dtype_outside_allow_list_in_manifest(tmp_path: Path, tamper: Callable, dtype: str) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    tamper(ckpt, lambda b: b["tensors"]["w"].update(dtype=dtype))
    with pytest.raises(safepoint.CorruptCheckpointError, match="allow-list"):
        restore_by_name(ckpt)


def _peak_during(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(safepoint.CorruptCheckpointError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape", [[1 << 40], [1 << 20, 1 << 20], [2**62, 2**62]])
def test_shape_bomb_in_manifest_allocates_nothing(
    tmp_path: Path, tamper: Callable, shape: list[int]
) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    tamper(ckpt, lambda b: b["tensors"]["w"].update(shape=shape))
    peak = _peak_during(lambda: restore_by_name(ckpt))
    assert peak < 16 << 20, peak


# ----------------------------------------------------------------- safetensors header attacks
def write_safetensors(path: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _header_case(ckpt: Path, header_edit: Callable[[dict], None], data: bytes | None = None):
    p = ckpt / PAYLOAD
    raw = p.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    header_edit(header)
    write_safetensors(p, header, raw[8 + hlen :] if data is None else data)
    resign_payload(ckpt)


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["w"].update(data_offsets=[-8, 56]),
        lambda h: h["w"].update(data_offsets=[8, 72]),  # overlaps b
        lambda h: h["b"].update(data_offsets=[0, 24]),  # overlaps w
        lambda h: h["w"].update(data_offsets=[0, 2**63]),
        lambda h: h["w"].update(data_offsets=[64, 0]),
        lambda h: h["w"].update(data_offsets=[0.0, 64.0]),
        lambda h: h["w"].update(dtype="STR"),
        lambda h: h["w"].update(dtype="F64"),  # differs from manifest
        lambda h: h["w"].update(shape=[1 << 40]),  # shape bomb vs. byte span
        lambda h: h["w"].update(shape=[8, 2]),  # same bytes, different shape than manifest
        lambda h: h.pop("w"),
        lambda h: h.update(extra={"dtype": "U8", "shape": [4], "data_offsets": [88, 92]}),
    ],
    ids=[
        "negative-offset",
        "overlap-1",
        "overlap-2",
        "huge-offset",
        "reversed",
        "float-offsets",
        "bad-dtype",
        "dtype-mismatch",
        "shape-bomb",
        "shape-mismatch",
        "missing-tensor",
        "trailing-extra",
    ],
)
def test_hostile_safetensors_header(tmp_path: Path, edit: Callable[[dict], None]) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    _header_case(ckpt, edit)
    peak = _peak_during(lambda: restore_by_name(ckpt))
    assert peak < 16 << 20, peak


def test_header_length_bomb(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    p = ckpt / PAYLOAD
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**63) + raw[8:])
    resign_payload(ckpt)
    peak = _peak_during(lambda: restore_by_name(ckpt))
    assert peak < 16 << 20, peak


def test_duplicate_and_deep_keys_in_safetensors_header(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "run")
    p = ckpt / PAYLOAD
    raw = p.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + hlen].decode().rstrip()
    dup = text[:-1] + ',"w":' + json.dumps(json.loads(text)["w"]) + "}"
    for bad_header in (dup, '{"__metadata__":' + "[" * 10_000 + "]" * 10_000 + "}"):
        data = bad_header.encode()
        data += b" " * (-len(data) % 8)
        p.write_bytes(struct.pack("<Q", len(data)) + data + raw[8 + hlen :])
        resign_payload(ckpt)
        with pytest.raises(safepoint.CorruptCheckpointError, match=PAYLOAD):
            restore_by_name(ckpt)


# ----------------------------------------------------------------- hdf5 attacks
def _h5_checkpoint(tmp_path: Path) -> Path:
    pytest.importorskip("h5py")
    return make_checkpoint(tmp_path / "run", format="hdf5")


def _rewrite_h5(ckpt: Path, build: Callable[[Any, Path], None]) -> None:
    import h5py

    fname = "model-00000.h5"
    p = ckpt / fname
    with h5py.File(p, "r") as h5:
        names = {name: h5[name][()] for name in h5}
    os.unlink(p)
    with h5py.File(p, "w") as h5:
        for name, value in names.items():
            h5.create_dataset(name, data=value)
        build(h5, ckpt)
    resign_payload(ckpt, fname)


def _external_link(h5: Any, ckpt: Path) -> None:
    import h5py

    outside = ckpt.parent.parent / "outside.h5"
    with h5py.File(outside, "w") as other:
        other.create_dataset("data", data=np.arange(16, dtype=np.float32).reshape(4, 4))
    del h5["t000000"]
    h5["t000000"] = h5py.ExternalLink(str(outside), "data")


def _soft_link(h5: Any, ckpt: Path) -> None:
    import h5py

    h5["real"] = h5["t000000"][()]
    del h5["t000000"]
    h5["t000000"] = h5py.SoftLink("/real")


def _external_storage(h5: Any, ckpt: Path) -> None:
    raw = ckpt.parent.parent / "outside.bin"
    raw.write_bytes(np.arange(16, dtype=np.float32).tobytes())
    del h5["t000000"]
    h5.create_dataset("t000000", shape=(4, 4), dtype=np.float32, external=[(str(raw), 0, 64)])


def _virtual(h5: Any, ckpt: Path) -> None:
    import h5py

    outside = ckpt.parent.parent / "outside.h5"
    with h5py.File(outside, "w") as other:
        other.create_dataset("data", data=np.arange(16, dtype=np.float32).reshape(4, 4))
    layout = h5py.VirtualLayout(shape=(4, 4), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(outside), "data", shape=(4, 4))
    del h5["t000000"]
    h5.create_virtual_dataset("t000000", layout)


def _chunked(h5: Any, ckpt: Path) -> None:
    del h5["t000000"]
    h5.create_dataset("t000000", data=np.zeros((4, 4), np.float32), chunks=(2, 2))


@pytest.mark.parametrize(
    "build",
    [_external_link, _soft_link, _external_storage, _virtual, _chunked],
    ids=["external-link", "soft-link", "external-storage", "virtual", "chunked"],
)
def test_hostile_hdf5_payload(tmp_path: Path, build: Callable[[Any, Path], None]) -> None:
    ckpt = _h5_checkpoint(tmp_path)
    _rewrite_h5(ckpt, build)
    with pytest.raises(safepoint.CorruptCheckpointError, match=r"model-00000\.h5"):
        restore_by_name(ckpt)


def test_hdf5_shape_bomb(tmp_path: Path, tamper: Callable) -> None:
    ckpt = _h5_checkpoint(tmp_path)
    tamper(ckpt, lambda b: b["tensors"]["w"].update(shape=[1 << 40]))
    peak = _peak_during(lambda: restore_by_name(ckpt))
    assert peak < 16 << 20, peak


@pytest.mark.parametrize(
    "tree",
    [
        {"w": {"$pickle": "gASV"}},
        {"w": {"$stateful": "os.system", "state": 1, "x": 2}},
        {"w": {"$dict": [[True, 1]]}},
        {"w": {"$int": "0xzz"}},
        {"w": {"$float": "1e999"}},
    ],
    ids=["unknown-tag", "bad-stateful", "bool-key", "bad-int", "bad-float"],
)
def test_malformed_tree_is_corrupt_on_restore(
    tmp_path: Path, tamper: Callable[..., None], tree: dict[str, Any]
) -> None:
    """The tree is decoded only on restore; a malformed node must fail it there."""
    ckpt = make_checkpoint(tmp_path / "run")
    tamper(ckpt, lambda b: b.update(tree=tree))
    with pytest.raises(safepoint.CorruptCheckpointError, match="malformed"):
        restore_by_name(ckpt)


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


def _size_edit(value):
    def edit(body):
        next(iter(body["files"].values()))["size"] = value

    return edit


MANIFEST_EDITS = {
    "negative-size": _size_edit(-1),
    "float-size": _size_edit(1.5),
    "bool-size": _size_edit(True),
    "huge-size": _size_edit(2**70),
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


def test_newer_format_version_says_upgrade(ckpt):
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


def test_header_length_bomb_is_corrupt(ckpt):
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


def _rewrite_h5_with(ckpt: Path, fn) -> None:
    import h5py

    path = ckpt / "model-00000.h5"
    with h5py.File(path, "a") as h5:
        fn(h5, ckpt)
    _repayload(ckpt, "model-00000.h5", path.read_bytes())


def _dataset_of(ckpt: Path) -> str:
    return _body(ckpt)["tensors"]["model/w"]["name"]


def _edit_external_link(h5, ckpt):
    import h5py

    name = _dataset_of(ckpt)
    other = ckpt.parent.parent / "other.h5"
    with h5py.File(other, "w") as o:
        o["d"] = np.zeros((3, 4), np.float32)
    del h5[name]
    h5[name] = h5py.ExternalLink(str(other), "d")


def _edit_external_storage(h5, ckpt):
    name = _dataset_of(ckpt)
    raw = ckpt.parent.parent / "raw.bin"
    raw.write_bytes(bytes(48))
    del h5[name]
    h5.create_dataset(name, shape=(3, 4), dtype=np.float32, external=[(str(raw), 0, 48)])


def _edit_virtual(h5, ckpt):
    import h5py

    name = _dataset_of(ckpt)
    h5["src"] = np.zeros((3, 4), np.float32)
    layout = h5py.VirtualLayout(shape=(3, 4), dtype=np.float32)
    layout[:] = h5py.VirtualSource(h5["src"])
    del h5[name]
    h5.create_virtual_dataset(name, layout)


def _edit_soft_link(h5, ckpt):
    import h5py

    name = _dataset_of(ckpt)
    h5["elsewhere"] = h5[name][()]
    del h5[name]
    h5[name] = h5py.SoftLink("/elsewhere")


@pytest.mark.parametrize(
    "edit", [_edit_external_link, _edit_external_storage, _edit_virtual, _edit_soft_link]
)
def test_hdf5_links_external_and_virtual_storage_are_refused(h5ckpt, edit):
    _rewrite_h5_with(h5ckpt, edit)
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
