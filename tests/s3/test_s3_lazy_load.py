"""``safepoint.load(url, mmap=True)``: only the tensors a reader touches leave the bucket."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import pytest

import safepoint
from safepoint.errors import CheckpointNotFoundError, CorruptCheckpointError

s3 = pytest.importorskip("safepoint.storage.s3")
from safepoint.storage.s3.client import S3Client  # noqa: E402

MIB = 1 << 20


@pytest.fixture
def fetched_bytes(monkeypatch):
    """Bytes of payload read through ranged GETs, counted across threads."""
    total = [0]
    lock = threading.Lock()
    real_into, real_range = S3Client.get_range_into, S3Client.get_range

    def into(self, relkey, start, view):
        with lock:
            total[0] += view.nbytes
        return real_into(self, relkey, start, view)

    def ranged(self, relkey, start, end, *, stage="read"):
        with lock:
            total[0] += end - start
        return real_range(self, relkey, start, end, stage=stage)

    monkeypatch.setattr(S3Client, "get_range_into", into)
    monkeypatch.setattr(S3Client, "get_range", ranged)
    return total


def _state():
    rng = np.random.default_rng(5)
    return {
        "model": {f"layer{i}": rng.standard_normal(MIB, dtype=np.float32) for i in range(6)},
        "opt": {"step": 7, "lr": 0.5, "moments": [np.arange(10.0), np.ones(3)]},
        "note": "é$",
    }


def test_a_lazy_load_reads_only_the_tensors_touched(s3_env, s3_root, fetched_bytes):
    state = _state()
    mgr = safepoint.CheckpointManager(s3_root)
    name = mgr.save(state, step=1).name
    mgr.close()
    fetched_bytes[0] = 0
    lazy = safepoint.load(f"{s3_root}/{name}", mmap=True)
    opened = fetched_bytes[0]
    assert opened < 256 << 10  # headers only, not the 24 MiB of tensors
    assert isinstance(lazy, Mapping) and sorted(lazy) == ["model", "note", "opt"]
    assert lazy["note"] == "é$" and lazy["opt"]["step"] == 7
    assert len(lazy["model"]) == 6 and "0 of 6 read" in repr(lazy["model"])
    one = lazy["model"]["layer3"]
    assert one.tobytes() == state["model"]["layer3"].tobytes()
    assert 4 * MIB <= fetched_bytes[0] - opened < 5 * MIB  # that one tensor
    assert lazy["model"]["layer3"] is one  # read once
    assert [m.tolist() for m in lazy["opt"]["moments"]] == [[*np.arange(10.0)], [1.0] * 3]
    eager = safepoint.load(f"{s3_root}/{name}")
    for key, value in state["model"].items():
        assert lazy["model"][key].tobytes() == eager["model"][key].tobytes() == value.tobytes()


def test_lazy_torch_tensors_come_back_as_saved(s3_env, s3_root):
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(300, 200)
    mgr = safepoint.CheckpointManager(s3_root)
    name = mgr.save({"model": model.state_dict()}, step=1).name
    mgr.close()
    lazy = safepoint.load(f"{s3_root}/{name}", mmap=True, as_numpy=False)
    fresh = torch.nn.Linear(300, 200)
    fresh.load_state_dict(lazy["model"])  # a Mapping is what load_state_dict takes
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_a_checkpoint_deleted_before_its_tensors_are_read_is_named(s3_env, s3_root):
    mgr = safepoint.CheckpointManager(s3_root, keep=safepoint.Keep(last=1))
    name = mgr.save(_state(), step=1).name
    lazy = safepoint.load(f"{s3_root}/{name}", mmap=True)
    mgr.save(_state(), step=2)  # retention deletes step 1
    mgr.close()
    with pytest.raises(CheckpointNotFoundError, match="deleted or re-saved after it was loaded"):
        lazy["model"]["layer0"]


def test_a_missing_payload_at_a_lazy_load_is_damage(s3_env, s3_root):
    mgr = safepoint.CheckpointManager(s3_root)
    name = mgr.save(_state(), step=1).name
    mgr.close()
    storage = s3.open_root(s3_root)
    fname = sorted(safepoint.CheckpointManager(storage).catalog.manifest(name).files)[0]
    storage.client.delete([storage._key(f"{name}/{fname}")], stage="test")
    with pytest.raises(CorruptCheckpointError, match="missing"):
        safepoint.load(f"{s3_root}/{name}", mmap=True)


def test_lazy_tensors_are_writable_and_copy_to_plain_dicts(s3_env, s3_root):
    import copy

    state = {"small": np.arange(8.0), "big": np.ones(1 << 20), "sub": {"x": np.zeros(3)}}
    mgr = safepoint.CheckpointManager(s3_root)
    name = mgr.save(state, step=1).name
    mgr.close()
    lazy = safepoint.load(f"{s3_root}/{name}", mmap=True)
    for key in ("small", "big"):
        lazy[key][0] = 42.0  # writable, whether it lay in the head fetched first or not
        assert lazy[key][0] == 42.0
    plain = copy.deepcopy(lazy)
    assert type(plain) is dict and type(plain["sub"]) is dict
    assert plain["sub"]["x"].tolist() == [0.0] * 3 and plain["small"][0] == 42.0
