"""Hostile checkpoints: RELIABILITY.md's bad-input table, row by row.

A checkpoint from the internet may be built to execute code, to read files outside
its directory, or to make the reader allocate terabytes. None of that may happen:
each case must end in the documented error. The manifest checksums itself, so cases
that target deeper validation re-sign the tampered manifest (and payload sizes and
digests) exactly as an attacker would.
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
