"""Dedup on a bucket (issue 15): blobs stored once as objects, referenced by records.

Against the real SeaweedFS server: shared tensors are uploaded once, every reader
(restore, load, lazy load, verify, ls, convert --standalone) sees the same state as
without dedup, retention frees only unreferenced blobs, a save in flight keeps what it
references, a damaged blob is detected, and gc reclaims what crashed saves left.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint.cli.commands import main as cli
from safepoint.errors import ConfigError, CorruptCheckpointError

torch = pytest.importorskip("torch")
s3 = pytest.importorskip("safepoint.storage.s3")

N = 64 * 1024  # 256 KiB of float32 per tensor


def _blobs(storage: Any) -> dict[str, int]:
    return {
        m["path"].split("/", 1)[1]: int(m["size"]) for m in storage.client.list_all(".sp-blobs/")
    }


class Run:
    """A fine-tuning state: a frozen base, an EMA equal to it, a trainable head."""

    def __init__(self) -> None:
        self.frozen = torch.arange(N, dtype=torch.float32)
        self.frozen.requires_grad_(False)
        self.ema = self.frozen.clone()
        self.head = torch.zeros(N // 8)

    def state(self, step: int) -> dict[str, Any]:
        self.head.fill_(float(step))
        self.ema.mul_(1.0)  # an in-place update that leaves the bytes equal
        return {"frozen": self.frozen, "ema": self.ema, "head": self.head, "step": step}


def _same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(torch.as_tensor(np.asarray(got[key])), value), key
        else:
            assert got[key] == value, key


def test_shared_tensors_are_uploaded_once_and_read_back_exactly(s3_server, s3_root, tmp_path):
    run = Run()
    wants = {}
    mgr = safepoint.CheckpointManager(
        s3_root, storage_options=s3_server.options, dedup=True, keep=safepoint.Keep(last=3)
    )
    try:
        for step in range(1, 6):
            state = run.state(step)
            wants[step] = {
                k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()
            }
            mgr.save(state, step=step)
        storage = mgr.storage
        listed = [c.step for c in mgr.checkpoints()]
        assert listed == [3, 4, 5]
        # frozen and ema are one blob in every checkpoint; the head goes to own files
        refs = {k for s in listed for k in storage.record_refs(f"step-{s:08d}").values()}
        assert len(refs) == 1 and _blobs(storage)[next(iter(refs))] > N * 4
        # the head's blob of the first save (unknown then) is unreferenced since step 1
        # went; younger than the in-process grace, it waits for a later collection
        assert storage.blob_store().collect(grace_s=0)[0] == 1
        assert set(_blobs(storage)) == refs
        for step in listed:
            got = mgr.restore(checkpoint=f"step-{step:08d}")
            assert got is not None
            _same(got.state, wants[step])
        assert all(v.ok for v in mgr.verify())
    finally:
        mgr.close()
    # another reader (a fresh storage, no cache) loads it, eagerly and lazily
    url = f"{s3_root}/step-00000005"
    _same(safepoint.load(url, storage_options=s3_server.options), wants[5])
    lazy = safepoint.load(url, storage_options=s3_server.options, mmap=True)
    assert np.array_equal(np.asarray(lazy["frozen"]), wants[5]["frozen"].numpy())


def test_ls_verify_and_standalone_export_from_a_bucket(
    s3_server, s3_root, s3_env, tmp_path, capsys
):
    run = Run()
    with safepoint.CheckpointManager(s3_root, dedup=True) as mgr:
        for step in (1, 2):
            mgr.save(run.state(step), step=step)
    assert cli(["ls", s3_root, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    rows = rows if isinstance(rows, list) else rows["checkpoints"]
    for row in rows:
        assert row["shared_bytes"] > N * 4 > row["own_bytes"] > 0, row
    assert cli(["verify", s3_root]) == 0
    out = tmp_path / "export"
    assert cli(["convert", f"{s3_root}/step-00000002", "--standalone", "--out", str(out)]) == 0
    got = safepoint.load(out)
    _same(got, run.state(2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert not any("blob" in f for f in manifest["files"].values())


def test_retention_frees_only_unreferenced_blobs(s3_server, s3_root):
    base = torch.arange(N, dtype=torch.float32)
    mgr = safepoint.CheckpointManager(
        s3_root, storage_options=s3_server.options, dedup=True, keep=safepoint.Keep(last=1)
    )
    try:
        # step 1: "a" becomes a blob; step 2: "a" changed (its old blob unreferenced)
        mgr.save({"a": base.clone(), "b": base + 1}, step=1)
        first = set(_blobs(mgr.storage))
        assert len(first) == 2
        mgr.save({"a": base * 3, "b": base + 1}, step=2)
        kept = set(_blobs(mgr.storage))
        refs = mgr.storage.record_refs("step-00000002")
        assert set(refs.values()) <= kept
        # the blob only step 1 referenced goes once older than the in-process grace (the
        # next retention pass, or a collection as below); "b" is still shared
    finally:
        mgr.close()
    storage = s3.S3Storage(s3_root, s3_server.options)
    storage.lock()
    try:
        freed = storage.blob_store().collect(grace_s=0)
        left = set(_blobs(storage))
        assert set(storage.record_refs("step-00000002").values()) == left
        assert freed[0] == len(kept) - len(left)
    finally:
        storage.unlock()
    got = safepoint.load(f"{s3_root}/step-00000002", storage_options=s3_server.options)
    assert torch.equal(torch.as_tensor(got["a"]), base * 3)


def test_a_save_in_flight_keeps_the_blobs_it_references(s3_server, s3_root):
    base = torch.arange(N, dtype=torch.float32)
    with safepoint.CheckpointManager(s3_root, storage_options=s3_server.options, dedup=True) as mgr:
        mgr.save({"a": base}, step=1)
        (key,) = _blobs(mgr.storage)
        mgr.delete("step-00000001")  # now nothing committed references the blob
        in_flight = mgr.storage.blob_store()
        assert in_flight.link(key, "unused")  # a save referenced it, not yet committed
        assert mgr.storage.blob_store().collect(grace_s=0) == (0, 0)
        assert key in _blobs(mgr.storage)
        in_flight.release()  # that save ended without committing
        count, freed = mgr.storage.blob_store().collect(grace_s=0)
        assert count == 1 and freed > N * 4 and not _blobs(mgr.storage)
        # a save after the collection uploads it again instead of referencing a ghost
        mgr.save({"a": base}, step=2)
    got = safepoint.load(f"{s3_root}/step-00000002", storage_options=s3_server.options)
    assert torch.equal(torch.as_tensor(got["a"]), base)


def test_a_damaged_blob_is_detected_not_loaded(s3_server, s3_root):
    base = torch.arange(N, dtype=torch.float32)
    with safepoint.CheckpointManager(s3_root, storage_options=s3_server.options, dedup=True) as mgr:
        mgr.save({"a": base, "h": torch.zeros(3)}, step=1)
        storage = mgr.storage
        sizes = _blobs(storage)
        key = max(sizes, key=sizes.__getitem__)  # "a"'s blob
        data = bytearray(storage.client.get(f".sp-blobs/{key}")[0])
        data[-1] ^= 0xFF
        storage.client.put(f".sp-blobs/{key}", bytes(data), stage="test")
        (result,) = mgr.verify()
        assert result.error is not None and ".safetensors" in str(result.error)
    with pytest.raises(CorruptCheckpointError):
        safepoint.load(f"{s3_root}/step-00000001", storage_options=s3_server.options)


def test_a_resumed_run_uploads_no_shared_bytes_again(s3_server, s3_root, monkeypatch):
    run = Run()
    with safepoint.CheckpointManager(s3_root, storage_options=s3_server.options, dedup=True) as mgr:
        mgr.save(run.state(1), step=1)
    uploaded: list[str] = []
    real = s3.S3Storage.open_write

    def counting(self: Any, relpath: str) -> Any:
        uploaded.append(relpath)
        return real(self, relpath)

    monkeypatch.setattr(s3.S3Storage, "open_write", counting)
    # a new process resuming: every tensor is hashed, the frozen one found in the bucket
    with safepoint.CheckpointManager(s3_root, storage_options=s3_server.options, dedup=True) as mgr:
        mgr.save(run.state(2), step=2)
        mgr.save(run.state(3), step=3)
    # the first save of the resumed manager hashed every tensor: the frozen base (and
    # the EMA equal to it) were found in the bucket, only the changed head became a blob
    sizes = _blobs(mgr.storage)
    frozen = max(sizes, key=sizes.__getitem__)
    new = [p.split("/")[1] for p in uploaded if p.startswith(".sp-blobs/")]
    assert frozen not in new and len(new) == 1 and sizes.get(new[0], 0) < N, (new, sizes)


def test_async_dedup_saves_on_a_bucket(s3_server, s3_root):
    run = Run()
    with safepoint.CheckpointManager(
        s3_root, storage_options=s3_server.options, dedup=True, async_save=True
    ) as mgr:
        for step in (1, 2, 3):
            mgr.save(run.state(step), step=step)
            run.head.fill_(-1.0)  # changed right after save(): never what is saved
        mgr.wait()
        got = mgr.restore()
        assert got is not None and got.step == 3
        assert torch.equal(torch.as_tensor(got.state["head"]), torch.full((N // 8,), 3.0))
        assert len(set(mgr.storage.record_refs("step-00000003").values())) == 1


def test_local_first_with_dedup_is_refused(s3_server, s3_root, tmp_path: Path):
    with pytest.raises(ConfigError, match="local_first"):
        safepoint.CheckpointManager(
            s3_root, storage_options=s3_server.options, dedup=True, local_first=tmp_path / "lf"
        )


def _leak(storage: Any, payload: bytes) -> str:
    """A blob a killed save uploaded and never committed (what collection must remove)."""
    import hashlib

    key = hashlib.sha256(payload).hexdigest()[:32]
    storage.client.put(f".sp-blobs/{key}", payload, stage="test")
    return key


def test_gc_removes_unreferenced_blobs_only(s3_root, s3_env, capsys):
    base = torch.arange(N, dtype=torch.float32)
    with safepoint.CheckpointManager(s3_root, dedup=True) as mgr:
        mgr.save({"a": base}, step=1)
        storage = mgr.storage
        kept = set(_blobs(storage))
        leaked = _leak(storage, b"never committed")
    assert cli(["gc", s3_root, "--grace", "3600"]) == 0  # too young: kept
    assert leaked in _blobs(storage)
    capsys.readouterr()
    assert cli(["gc", s3_root, "--grace", "0"]) == 0
    assert "1 unreferenced blobs removed" in capsys.readouterr().out
    assert set(_blobs(storage)) == kept
    got = safepoint.load(f"{s3_root}/step-00000001")
    assert torch.equal(torch.as_tensor(got["a"]), base)


def test_a_managers_first_save_collects_what_a_crashed_save_left(s3_server, s3_root, monkeypatch):
    from safepoint.manager import dedup as manager_dedup

    base = torch.arange(N, dtype=torch.float32)
    with safepoint.CheckpointManager(s3_root, storage_options=s3_server.options, dedup=True) as mgr:
        mgr.save({"a": base}, step=1)
        leaked = _leak(mgr.storage, b"left by a killed writer")
    monkeypatch.setattr(manager_dedup, "STARTUP_GRACE_S", 0.0)
    with safepoint.CheckpointManager(s3_root, storage_options=s3_server.options, dedup=True) as mgr:
        mgr.save({"a": base}, step=2)
        left = _blobs(mgr.storage)
    assert leaked not in left and len(left) == 1
