"""A second backend plugs in: a dict-backed Storage implementing only the protocol.

If the formats, catalog or manager reached past :class:`safepoint.storage.protocol.Storage`
(a ``fileno()``, a path, a private method of the local backend), these round trips
would fail on this backend, which has none of them.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import pytest

import safepoint
from safepoint.ondisk.names import check_name
from safepoint.storage.protocol import LocalFiles, Storage


class _MemoryWriter:
    def __init__(self, store: MemoryStorage, relpath: str) -> None:
        self._store, self._relpath, self._parts = store, relpath, bytearray()

    def write(self, buffers: Sequence[memoryview]) -> None:
        for buf in buffers:
            self._parts += bytes(buf)

    def close(self) -> None:
        self._store.files[self._relpath] = bytes(self._parts)

    def abort(self) -> None:
        self._parts.clear()


class MemoryStorage:
    """A root in a dict: ``files`` maps ``name/file`` to bytes; a dict swap commits."""

    def __init__(self, root: str = "mem://run") -> None:
        self.root = root
        self.files: dict[str, bytes] = {}
        self.log: list[str] = []
        self.calls: list[str] = []
        self._lock = threading.RLock()
        self._seq = 0
        self._staged = 0

    def _names(self) -> set[str]:
        return {key.split("/", 1)[0] for key in self.files}

    def list_names(self) -> list[str]:
        return sorted(n for n in self._names() if not n.startswith(".staged-"))

    def is_dir(self, name: str) -> bool:
        return any(key.startswith(f"{name}/") for key in self.files)

    def exists(self, relpath: str) -> bool:
        return relpath in self.files or self.is_dir(relpath)

    def size(self, relpath: str) -> int:
        if relpath not in self.files:
            raise FileNotFoundError(relpath)
        return len(self.files[relpath])

    def read_bytes(self, relpath: str, *, max_size: int) -> bytes:
        if relpath not in self.files:
            raise FileNotFoundError(relpath)
        if len(self.files[relpath]) > max_size:
            raise safepoint.CorruptCheckpointError(f"{relpath} is too large")
        return self.files[relpath]

    def open_read(self, relpath: str) -> BinaryIO:
        self.calls.append(f"open_read {relpath}")
        if relpath not in self.files:
            raise FileNotFoundError(relpath)
        return io.BytesIO(self.files[relpath])

    def read_log(self) -> bytes:
        return "".join(self.log).encode()

    def lock(self) -> None:
        self.calls.append("lock")

    def unlock(self) -> None:
        self.calls.append("unlock")

    def serial(self) -> threading.RLock:
        return self._lock

    def next_seq(self, listed: int) -> int:
        self._seq = max(self._seq, listed) + 1
        return self._seq

    def recover(self) -> list[str]:
        return []

    def cleanup_stale(self) -> list[str]:
        stale = {k.split("/", 1)[0] for k in self.files if k.startswith(".staged-")}
        self.files = {k: v for k, v in self.files.items() if k.split("/", 1)[0] not in stale}
        return sorted(stale)

    def stage(self, name: str) -> str:
        check_name(name)
        self._staged += 1
        self.calls.append(f"stage {name}")
        return f".staged-{self._staged}"

    def open_write(self, relpath: str) -> _MemoryWriter:
        return _MemoryWriter(self, relpath)

    def write_file(self, relpath: str, data: bytes, *, stage: str = "write") -> None:
        self.files[relpath] = bytes(data)

    def commit(self, staged: str, name: str) -> None:
        self.calls.append(f"commit {name}")
        moved = {
            f"{name}/{k.split('/', 1)[1]}": v
            for k, v in self.files.items()
            if k.startswith(f"{staged}/")
        }
        kept = {k: v for k, v in self.files.items() if not k.startswith((f"{staged}/", f"{name}/"))}
        self.files = {**kept, **moved}

    def discard(self, staged: str) -> None:
        self.files = {k: v for k, v in self.files.items() if not k.startswith(f"{staged}/")}

    def remove(self, name: str) -> None:
        self.calls.append(f"remove {name}")
        self.files = {k: v for k, v in self.files.items() if not k.startswith(f"{name}/")}

    def append_log(self, line: str) -> None:
        self.log.append(line if line.endswith("\n") else line + "\n")


def _is_storage(store: Storage) -> Storage:  # mypy: MemoryStorage satisfies the protocol
    return store


def _state(step: int) -> dict[str, object]:
    rng = np.random.default_rng(step)
    return {
        "w": rng.standard_normal((64, 33)).astype(np.float32),
        "b": rng.integers(0, 9, size=7, dtype=np.int64),
        "meta": {"step": step, "name": "ünïcode $x"},
    }


def test_the_memory_backend_has_no_local_capability() -> None:
    assert not isinstance(MemoryStorage(), LocalFiles)


@pytest.mark.parametrize("async_save", [False, True])
def test_save_restore_verify_and_retention_through_the_protocol_only(async_save: bool) -> None:
    store = _is_storage(MemoryStorage())
    assert isinstance(store, MemoryStorage)
    mgr = safepoint.CheckpointManager(
        store, keep=safepoint.Keep(last=2), monitor="loss", async_save=async_save
    )
    for step in range(4):
        mgr.save(_state(step), step=step, metrics={"loss": 1.0 / (step + 1)})
    mgr.wait()
    assert [c.step for c in mgr.checkpoints()] == [2, 3]
    assert all(v.ok for v in mgr.verify())
    ckpt = mgr.restore()
    mgr.close()
    assert ckpt is not None and ckpt.step == 3
    for key in ("w", "b"):
        np.testing.assert_array_equal(ckpt.state[key], _state(3)[key])
    assert ckpt.state["meta"] == {"step": 3, "name": "ünïcode $x"}
    # The documented call order: lock first, stage before commit, retention after it.
    calls = store.calls
    assert calls[0] == "lock" and calls[-1] == "unlock"
    assert calls.index("stage step-00000002") < calls.index("commit step-00000002")
    assert calls.index("commit step-00000002") < calls.index("remove step-00000000")
    events = [json.loads(line)["event"] for line in store.log]
    assert events.count("save") == 4 and "delete" in events


def test_a_flipped_byte_is_caught_and_latest_falls_back() -> None:
    store = MemoryStorage()
    mgr = safepoint.CheckpointManager(store)
    mgr.save(_state(1), step=1)
    mgr.save(_state(2), step=2)
    payload = "step-00000002/model-00000.safetensors"
    damaged = bytearray(store.files[payload])
    damaged[-3] ^= 0x40
    store.files[payload] = bytes(damaged)
    assert [v.ok for v in mgr.verify()] == [True, False]
    ckpt = mgr.restore()
    mgr.close()
    assert ckpt is not None and ckpt.step == 1
    np.testing.assert_array_equal(ckpt.state["w"], _state(1)["w"])


def test_lazy_restore_degrades_to_a_verified_read_without_local_files() -> None:
    store = MemoryStorage()
    with safepoint.CheckpointManager(store) as mgr:
        mgr.save(_state(5), step=5)
    from safepoint.catalog import reader

    _, tree = reader.read_checkpoint(store, "step-00000005", as_numpy=True, lazy=True)
    np.testing.assert_array_equal(tree["w"], _state(5)["w"])
    assert any(c.startswith("open_read step-00000005/") for c in store.calls)
