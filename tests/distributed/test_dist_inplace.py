"""Restores read in place: chunks go straight into live memory, verified as they land."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safepoint.catalog import chunked
from safepoint.errors import CorruptCheckpointError
from safepoint.ondisk import checksum
from safepoint.storage.local import LocalStorage, Storage

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed")

from safepoint.distributed.destinations import live_bytes  # noqa: E402  (needs torch)

WHOLE = np.arange(24, dtype=np.float32).reshape(6, 4)
# rows 0-3 and 4-5 of WHOLE, stored in that order in one file
CHUNKS = [
    {"offsets": [0, 0], "sizes": [4, 4], "file": "rank-00000.bin", "begin": 0, "end": 64},
    {"offsets": [4, 0], "sizes": [2, 4], "file": "rank-00000.bin", "begin": 64, "end": 96},
]
ENTRY: dict[str, Any] = {"dtype": "float32", "shape": [6, 4], "lib": "numpy", "chunks": CHUNKS}
for _c, _rows in zip(CHUNKS, (WHOLE[:4], WHOLE[4:]), strict=True):
    _c[checksum.ALGORITHM] = checksum.digest_bytes(_rows.tobytes())


def _storage(tmp_path: Path, payload: bytes = WHOLE.tobytes()) -> Storage:
    (tmp_path / "step-1").mkdir()
    (tmp_path / "step-1" / "rank-00000.bin").write_bytes(payload)
    return LocalStorage(tmp_path)


@pytest.mark.parametrize(
    ("offsets", "sizes"),
    [([0, 0], [6, 4]), ([4, 0], [2, 4]), ([2, 0], [4, 4]), ([1, 1], [4, 2]), ([0, 0], [0, 4])],
)
def test_boxes_read_into_live_memory_exactly(
    tmp_path: Path, offsets: list[int], sizes: list[int]
) -> None:
    storage = _storage(tmp_path)
    live = np.full(sizes, -1.0, dtype=np.float32)
    dest = live_bytes(live, ENTRY, sizes)
    assert (dest is None) == (sizes[0] == 0)
    if dest is None:
        return
    chunked.run_reads(chunked.box_reads(storage, "step-1", ENTRY, offsets, sizes, dest))
    box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
    assert np.array_equal(live, WHOLE[box])


def test_a_flipped_byte_read_in_place_names_the_file(tmp_path: Path) -> None:
    bad = bytearray(WHOLE.tobytes())
    bad[70] ^= 1
    storage = _storage(tmp_path, bytes(bad))
    live = np.zeros((6, 4), dtype=np.float32)
    reads = chunked.box_reads(
        storage, "step-1", ENTRY, [0, 0], [6, 4], live_bytes(live, ENTRY, [6, 4])
    )  # type: ignore[arg-type]
    with pytest.raises(CorruptCheckpointError, match=r"rank-00000\.bin \(bytes 64-96\)"):
        chunked.run_reads(reads)


def test_a_short_file_is_refused_not_half_read(tmp_path: Path) -> None:
    storage = _storage(tmp_path, WHOLE.tobytes()[:80])
    with pytest.raises(CorruptCheckpointError, match="ended early"):
        chunked.read_chunk(storage, "step-1", CHUNKS[1])


class _NoFd:
    """A storage whose readers have no file descriptor (an object store's)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def open_read(self, relpath: str) -> io.BytesIO:
        return io.BytesIO(self.data)  # its fileno() raises UnsupportedOperation


def test_readers_without_a_file_descriptor_fill_too() -> None:
    live = np.zeros((2, 4), dtype=np.float32)
    chunked.fill(_NoFd(WHOLE.tobytes()), "step-1", CHUNKS[1], live_bytes(live, ENTRY, [2, 4]).data)  # type: ignore[arg-type,union-attr]
    assert np.array_equal(live, WHOLE[4:])


def test_live_bytes_only_for_memory_that_takes_the_bytes_as_they_are() -> None:
    entry = {"dtype": "bfloat16", "shape": [4, 2], "lib": "torch"}
    t = torch.zeros(4, 2, dtype=torch.bfloat16, requires_grad=True)
    dest = live_bytes(t, entry, [4, 2])
    assert dest is not None and dest.nbytes == 16
    dest[:] = np.frombuffer(
        torch.ones(4, 2, dtype=torch.bfloat16).view(torch.uint8).numpy(), np.uint8
    )
    assert torch.equal(t.detach(), torch.ones(4, 2, dtype=torch.bfloat16))  # its own memory
    assert live_bytes(t.float(), entry, [4, 2]) is None  # another dtype
    assert live_bytes(torch.zeros(2, 4, dtype=torch.bfloat16).t(), entry, [4, 2]) is None  # strided
    assert live_bytes(t, entry, [2, 4]) is None  # another shape
    assert live_bytes(t, {**entry, "lib": "numpy"}, [4, 2]) is None  # saved as numpy
    assert live_bytes(np.zeros((4, 2), np.float32)[::1, ::1].T.T, ENTRY, [4, 2]) is not None
    readonly = np.zeros((4, 2), np.float32)
    readonly.flags.writeable = False
    assert live_bytes(readonly, ENTRY, [4, 2]) is None
