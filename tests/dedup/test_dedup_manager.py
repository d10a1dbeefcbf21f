"""Dedup saves (issue 15): equal bytes stored once, readers see the same state tree,
retention frees only what no remaining checkpoint references."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint.errors import ConfigError, CorruptCheckpointError
from safepoint.ondisk.names import BLOBS
from safepoint.storage import blobs
from safepoint_testing import assert_same, read_manifest, write_manifest

torch = pytest.importorskip("torch")


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    model[0].requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    return model, opt


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 32)).sum().backward()
    opt.step()


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    return {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema}


def _inodes(root: Path) -> dict[int, int]:
    """inode -> size of every payload file of every checkpoint."""
    out = {}
    for ckpt in root.iterdir():
        if ckpt.name.startswith(".") or not ckpt.is_dir():
            continue
        for f in ckpt.iterdir():
            if f.suffix == ".safetensors":
                st = f.stat()
                out[st.st_ino] = st.st_size
    return out


def test_same_state_loads_equal_with_and_without_dedup(tmp_path: Path) -> None:
    model, opt = _model()
    _step(model, opt)
    state = {**_state(model, opt), "np": np.arange(10, dtype=np.int16), "x": 3}
    for flag in (False, True):
        with safepoint.CheckpointManager(tmp_path / str(flag), dedup=flag) as mgr:
            mgr.save(state, step=1)
    plain = safepoint.load(tmp_path / "False" / "step-00000001")
    dedup = safepoint.load(tmp_path / "True" / "step-00000001")
    assert_same(plain, dedup)
    torch_plain = safepoint.load(tmp_path / "False" / "step-00000001", as_numpy=False)
    torch_dedup = safepoint.load(tmp_path / "True" / "step-00000001", as_numpy=False)
    assert_same(torch_plain, torch_dedup)


def _file_of(root: Path, ckpt: str, key: str) -> os.stat_result:
    body = read_manifest(root / ckpt)
    return (root / ckpt / body["tensors"][key]["file"]).stat()


def test_frozen_and_ema_stored_once(tmp_path: Path) -> None:
    for flag in (False, True):
        model, opt = _model()
        with safepoint.CheckpointManager(tmp_path / str(flag), dedup=flag) as mgr:
            for step in range(4):
                _step(model, opt)
                mgr.save(_state(model, opt), step=step)
            if flag:
                assert mgr._dedup is not None
                assert mgr._dedup.hints.hits == 2  # the frozen weight and bias: no hash
                # the trainable weight, bias and both moments of each: predicted changed
                assert mgr._dedup.hints.predicted >= 6
            for ckpt in mgr.checkpoints():
                restored = mgr.restore(checkpoint=ckpt.name)
                assert restored is not None
            assert_same(dict(_state(model, opt)["model"]), dict(mgr.restore().state["model"]))
    root = tmp_path / "True"
    frozen = {
        _file_of(root, f"step-{s:08d}", k).st_ino
        for s in range(4)
        for k in ("model/0.weight", "ema/0.weight")
    }
    assert len(frozen) == 1  # one blob: the frozen weight and its EMA, in all 4 checkpoints
    total, plain = sum(_inodes(root).values()), sum(_inodes(tmp_path / "False").values())
    frozen_bytes = model[0].weight.numel() * 4
    assert total < plain - 6 * frozen_bytes  # 8 copies of the frozen weight -> 1, at least


def test_in_place_change_is_saved_not_hinted(tmp_path: Path) -> None:
    weight = torch.zeros(100)
    with safepoint.CheckpointManager(tmp_path, dedup=True) as mgr:
        mgr.save({"w": weight}, step=0)
        mgr.save({"w": weight}, step=1)
        weight.add_(1)  # bumps the version counter
        mgr.save({"w": weight}, step=2)
        assert torch.equal(mgr.restore(checkpoint="step-00000001").state["w"], torch.zeros(100))
        assert torch.equal(mgr.restore().state["w"], torch.ones(100))


def test_write_bypassing_version_counter_caught_by_rehash_every_1(tmp_path: Path) -> None:
    weight = torch.zeros(100)
    with safepoint.CheckpointManager(tmp_path, dedup=True, dedup_rehash_every=1) as mgr:
        mgr.save({"w": weight}, step=0)
        weight.numpy()[:] = 7  # invisible to _version
        mgr.save({"w": weight}, step=1)
        assert torch.equal(mgr.restore().state["w"], torch.full((100,), 7.0))


def test_retention_frees_only_unreferenced_blobs(tmp_path: Path) -> None:
    frozen = torch.arange(1000, dtype=torch.float32)
    with safepoint.CheckpointManager(
        tmp_path, dedup=True, keep=safepoint.Keep(last=2), dedup_rehash_every=1
    ) as mgr:
        for step in range(5):
            # numpy, and every save a re-hash: a new blob at each save
            live = np.full(500, step, dtype=np.float32)
            mgr.save({"frozen": frozen, "live": live}, step=step)
        assert [c.name for c in mgr.checkpoints()] == ["step-00000003", "step-00000004"]
    # the deleted checkpoints' blobs are unreferenced; the frozen one is not
    live_size = (tmp_path / "step-00000004" / "model-00001.safetensors").stat().st_size
    assert blobs.collect(str(tmp_path), grace_s=0) == (3, 3 * live_size)
    assert len([n for n in os.listdir(tmp_path / BLOBS) if not n.startswith(".")]) == 3
    with safepoint.CheckpointManager(tmp_path) as mgr:
        assert all(v.error is None for v in mgr.verify())
        assert torch.equal(mgr.restore(checkpoint="step-00000003").state["frozen"], frozen)


def test_async_dedup_saves(tmp_path: Path) -> None:
    frozen = torch.arange(1000, dtype=torch.float32)
    live = torch.zeros(10)
    with safepoint.CheckpointManager(tmp_path, dedup=True, async_save=True) as mgr:
        for step in range(3):
            mgr.save({"frozen": frozen, "live": live}, step=step)
            live.add_(1)  # after the call: never in the checkpoint being saved
        mgr.wait()
        for step in range(3):
            got = mgr.restore(checkpoint=f"step-{step:08d}").state
            assert torch.equal(got["live"], torch.full((10,), float(step)))
            assert torch.equal(got["frozen"], frozen)
    assert len(_inodes(tmp_path)) == 4


def test_refused_configurations(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="format='safetensors'"):
        safepoint.CheckpointManager(tmp_path, dedup=True, format="hdf5")
    with pytest.raises(ConfigError, match="True or False"):
        safepoint.CheckpointManager(tmp_path, dedup=1)  # type: ignore[arg-type]

    class Collective:  # what coordination.find accepts as a caller-built collective
        def save(self, *args: object, **kwargs: object) -> None: ...
        def restore(self, *args: object, **kwargs: object) -> None: ...

    with pytest.raises(ConfigError, match="multi-rank"):  # never silently ignored
        safepoint.CheckpointManager(tmp_path, dedup=True, group=Collective())


@pytest.mark.parametrize("key", ["../../etc/passwd", "ABC", "0" * 31, 7])
def test_hostile_blob_key_refused(tmp_path: Path, key: object) -> None:
    with safepoint.CheckpointManager(tmp_path, dedup=True) as mgr:
        mgr.save({"w": torch.ones(3)}, step=0)
    ckpt = tmp_path / "step-00000000"
    body = read_manifest(ckpt)
    body["files"]["model-00000.safetensors"]["blob"] = key
    write_manifest(ckpt, body)
    with pytest.raises(CorruptCheckpointError, match="blob key"):
        safepoint.load(ckpt)


def test_hostile_size_refused_before_allocation(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path, dedup=True) as mgr:
        mgr.save({"w": torch.ones(3)}, step=0)
    ckpt = tmp_path / "step-00000000"
    body = read_manifest(ckpt)
    body["tensors"][next(iter(body["tensors"]))]["shape"] = [1 << 40]
    write_manifest(ckpt, body)
    with pytest.raises(CorruptCheckpointError, match="more bytes than the file holds"):
        safepoint.load(ckpt)


def test_damaged_blob_named_in_every_sharing_checkpoint(tmp_path: Path) -> None:
    frozen = torch.arange(1000, dtype=torch.float32)
    with safepoint.CheckpointManager(tmp_path, dedup=True) as mgr:
        for step in range(2):
            mgr.save({"frozen": frozen}, step=step)
    name = json.loads((tmp_path / "step-00000000" / "manifest.json").read_text())["files"]
    key = name["model-00000.safetensors"]["blob"]
    path = tmp_path / BLOBS / key
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:  # in place: every link sees it
        f.write(data)
    with safepoint.CheckpointManager(tmp_path) as mgr:
        errors = [v.error for v in mgr.verify()]
    assert all(e is not None and "model-00000.safetensors" in str(e) for e in errors)


def test_a_key_collision_never_substitutes_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safepoint.storage.blobs import LocalBlobStore

    monkeypatch.setattr(LocalBlobStore, "key", lambda self, head, buf: "ab" * 16)  # all collide
    a, b = torch.zeros(100), torch.ones(100)
    with safepoint.CheckpointManager(tmp_path, dedup=True) as mgr:
        mgr.save({"a": a, "b": b, "a2": a.clone()}, step=0)
        got = mgr.restore().state
        assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
        assert torch.equal(got["a2"], a)
        assert all(v.error is None for v in mgr.verify())
    files = read_manifest(tmp_path / "step-00000000")["files"]
    assert sorted("blob" in info for info in files.values()) == [False, True, True]


def _count_hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the tensors the local blob store hashes from now on."""
    from safepoint.storage.blobs import LocalBlobStore

    hashed: list[int] = []
    real_key = LocalBlobStore.key
    monkeypatch.setattr(
        LocalBlobStore,
        "key",
        lambda self, head, buf: hashed.append(buf.nbytes) or real_key(self, head, buf),
    )
    return hashed


def test_predicted_changes_skip_hashing_and_a_layer_frozen_later_is_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed = _count_hashed(monkeypatch)
    frozen, ema, live = torch.arange(300.0), torch.arange(300.0), torch.zeros(200)
    with safepoint.CheckpointManager(tmp_path, dedup=True, dedup_rehash_every=100) as mgr:
        for step in range(8):
            if step < 4:
                live.add_(1)  # trains until step 3, then frozen
            ema.mul_(1.0)  # an in-place EMA of frozen weights: new version, same bytes
            hashed.clear()
            mgr.save({"frozen": frozen, "ema": ema, "live": live}, step=step)
            assert mgr._dedup is not None
            hints = mgr._dedup.hints
            if step == 0:
                assert len(hashed) == 3  # unknown: everything hashed
            elif step in (1, 2, 3):  # live predicted changed: written, not hashed
                assert (hints.hits, hints.predicted, len(hashed)) == (1, 1, 1)
            elif step == 4:  # live stopped changing: hashed once, becomes a blob
                assert (hints.hits, hints.predicted, len(hashed)) == (1, 0, 2)
            else:  # then linked without a hash
                assert (hints.hits, hints.predicted, len(hashed)) == (2, 0, 1)
        for step in range(8):
            got = mgr.restore(checkpoint=f"step-{step:08d}").state
            assert torch.equal(got["live"], torch.full((200,), float(min(step, 3) + 1)))
            assert torch.equal(got["ema"], frozen) and torch.equal(got["frozen"], frozen)
    for step in range(8):  # the EMA shares the frozen weights' blob at every step
        name = f"step-{step:08d}"
        ino = _file_of(tmp_path, name, "frozen").st_ino
        assert _file_of(tmp_path, name, "ema").st_ino == ino
    lives = {_file_of(tmp_path, f"step-{s:08d}", "live").st_ino for s in range(4, 8)}
    assert len(lives) == 1  # frozen from step 4 on: one blob


def test_blobs_written_in_windows_of_held_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More new blobs than HELD_MAX: written, fsynced and published a window at a time."""
    from safepoint.storage import blob_writes

    monkeypatch.setattr(blob_writes, "HELD_MAX", 2)
    state = {f"t{i}": np.full(100 + i, i, dtype=np.float32) for i in range(7)}
    state["dup"] = state["t3"].copy()  # equal bytes in the same save: one blob
    with safepoint.CheckpointManager(tmp_path, dedup=True) as mgr:
        mgr.save(state, step=0)
        assert_same(state, mgr.restore().state)
        assert all(v.error is None for v in mgr.verify())
    assert len([n for n in os.listdir(tmp_path / BLOBS) if not n.startswith(".")]) == 7
    assert _file_of(tmp_path, "step-00000000", "dup").st_ino == (
        _file_of(tmp_path, "step-00000000", "t3").st_ino
    )


def test_numpy_arrays_are_predicted_by_their_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed = _count_hashed(monkeypatch)
    still = np.arange(3000, dtype=np.float32)
    with safepoint.CheckpointManager(tmp_path, dedup=True, dedup_rehash_every=100) as mgr:
        for step in range(4):
            changing = np.full(1000, step, dtype=np.float32)
            mgr.save({"still": still.copy(), "changing": changing}, step=step)
            if step == 1:
                hashed.clear()
        for step in range(4):
            got = mgr.restore(checkpoint=f"step-{step:08d}").state
            assert np.array_equal(got["changing"], np.full(1000, step, dtype=np.float32))
            assert np.array_equal(got["still"], still)
    # after the first saves the changing array is predicted (own file, not hashed); the
    # unchanged one (no version counter) is hashed and linked
    assert hashed == [still.nbytes] * 2
    files = read_manifest(tmp_path / "step-00000003")["files"]
    assert sum("blob" in f for f in files.values()) == 1


def test_a_write_that_bypasses_the_version_counter_is_caught(tmp_path: Path) -> None:
    frozen = torch.arange(100_000, dtype=torch.float32)
    with safepoint.CheckpointManager(tmp_path, dedup=True, dedup_rehash_every=100) as mgr:
        for step in range(3):
            mgr.save({"frozen": frozen}, step=step)
            frozen.data.add_(1.0)  # no _version bump: the hint alone would link stale bytes
        for step in range(3):
            got = mgr.restore(checkpoint=f"step-{step:08d}").state["frozen"]
            assert torch.equal(got, torch.arange(100_000, dtype=torch.float32) + step)


def test_optimizer_buffers_never_become_blobs(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    model[0].requires_grad_(False)  # a frozen layer
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    model(torch.ones(2, 64)).sum().backward()
    opt.step()
    with safepoint.CheckpointManager(tmp_path, dedup=True) as mgr:
        mgr.save({"model": model, "optim": opt}, step=0)
        got = mgr.restore().state
    manifest = read_manifest(tmp_path / "step-00000000")
    shared = {
        key
        for key, entry in manifest["tensors"].items()
        if "blob" in manifest["files"][entry["file"]]
    }
    # every weight is a blob (the first save cannot tell frozen from trainable); no
    # Adam moment or step counter is
    assert shared == {"model/0.weight", "model/0.bias", "model/1.weight", "model/1.bias"}
    moments = opt.state_dict()["state"]
    for index, buffers in moments.items():
        for name, value in buffers.items():
            assert torch.equal(got["optim"]["state"][index][name], value), (index, name)
