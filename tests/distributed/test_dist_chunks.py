"""Chunked manifest entries: sound ones parse and assemble, hostile ranges are refused."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint.errors import CorruptCheckpointError
from safepoint.ondisk import checksum
from safepoint.ondisk.manifest import Manifest, parse


def _chunk(data: bytes, begin: int, offsets: list[int], sizes: list[int]) -> dict[str, Any]:
    return {
        "offsets": offsets,
        "sizes": sizes,
        "file": "rank-00000.bin",
        "begin": begin,
        "end": begin + len(data),
        checksum.ALGORITHM: checksum.digest_bytes(data),
    }


def _manifest(chunks: list[dict[str, Any]], payload: bytes) -> Manifest:
    return Manifest(
        name="step-1",
        seq=1,
        step=1,
        epoch=None,
        created=1.0,
        metrics={},
        tree={"w": {"$tensor": "w"}},
        tensors={"w": {"dtype": "float32", "shape": [4, 2], "lib": "numpy", "chunks": chunks}},
        files={
            "rank-00000.bin": {
                "size": len(payload),
                checksum.ALGORITHM: checksum.digest_bytes(payload),
            }
        },
        extra={"container": "directory"},
    )


WHOLE = np.arange(8, dtype=np.float32).reshape(4, 2)
TOP, BOTTOM = WHOLE[:3].tobytes(), WHOLE[3:].tobytes()
PAYLOAD = BOTTOM + TOP  # stored out of order on purpose
GOOD = [_chunk(TOP, len(BOTTOM), [0, 0], [3, 2]), _chunk(BOTTOM, 0, [3, 0], [1, 2])]


def test_sound_chunks_parse_and_load_whole(tmp_path: Path) -> None:
    found = _manifest(GOOD, PAYLOAD)
    assert parse(found.to_bytes(), where="m").tensors["w"]["chunks"] == GOOD
    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    (ckpt / "rank-00000.bin").write_bytes(PAYLOAD)
    (ckpt / "manifest.json").write_bytes(found.to_bytes())
    assert np.array_equal(safepoint.load(ckpt)["w"], WHOLE)


def _hostile(change: Any) -> list[dict[str, Any]]:
    chunks = copy.deepcopy(GOOD)
    change(chunks)
    return chunks


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda c: c[1].update(offsets=[2, 0]), "overlap"),
        (lambda c: c[1].update(offsets=[4, 0]), "past the tensor"),
        (lambda c: c[1].update(offsets=[-1, 0]), "non-negative"),
        (lambda c: c[0].update(begin=-4), "non-negative"),
        (lambda c: c[0].update(end=10**6, begin=10**6 - 24), "past its file"),
        (lambda c: c[0].update(end=c[0]["end"] - 4), "does not match"),
        (lambda c: c.pop(), "cover"),
        (lambda c: c[0].update(file="../escape"), "unlisted file"),
        (lambda c: c[0].update(offsets=[0]), "one number per dimension"),
        (lambda c: c[0].update(sizes=[3.0, 2]), "non-negative integers"),
    ],
)
def test_hostile_chunk_ranges_are_refused(change: Any, why: str) -> None:
    data = _manifest(_hostile(change), PAYLOAD).to_bytes()
    with pytest.raises(CorruptCheckpointError, match=why):
        parse(data, where="m")


def test_flipped_chunk_bytes_name_the_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    bad = bytearray(PAYLOAD)
    bad[5] ^= 1
    (ckpt / "rank-00000.bin").write_bytes(bytes(bad))
    (ckpt / "manifest.json").write_bytes(_manifest(GOOD, PAYLOAD).to_bytes())
    with pytest.raises(CorruptCheckpointError, match=r"rank-00000\.bin"):
        safepoint.load(ckpt)
