"""A tree zip's tensor records are checked like a manifest's before any tensor is built."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safepoint.errors import CorruptCheckpointError
from safepoint.formats import treezip


def _state(**entry) -> bytes:
    record = {"dtype": "float32", "shape": [2, 2], "lib": "numpy", "offset": 0, **entry}
    body = {"format": treezip.FORMAT, "tree": {"w": {"$tensor": "w"}}, "tensors": {"w": record}}
    return json.dumps(body).encode()


def test_a_sound_record_reads_back():
    data = np.arange(4, dtype=np.float32)
    state = treezip.read("x.ckpt", _state(), data.tobytes())
    assert state["w"].tolist() == [[0.0, 1.0], [2.0, 3.0]]


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"shape": [2, -2]}, "shape must be a list of non-negative ints"),
        ({"shape": [True, 2]}, "shape must be a list of non-negative ints"),
        ({"shape": [1] * 65}, "shape must be a list of non-negative ints"),
        ({"lib": "pickle"}, "lib must be one of"),
        ({"lib": "numpy-scalar"}, "is a scalar with a shape"),
        ({"offset": -8}, "bad offset"),
        ({"shape": [1 << 40, 1 << 40]}, "outside the tensor bytes"),
        ({"offset": 8}, "outside the tensor bytes"),
    ],
)
def test_a_hostile_record_is_refused_naming_the_file(entry, why):
    with pytest.raises(CorruptCheckpointError, match=why) as info:
        treezip.read("x.ckpt", _state(**entry), bytes(16))
    assert str(info.value).startswith("x.ckpt: the state in this file is malformed")
