"""Comparison and tampering helpers shared by the core test files.

A plain module, not conftest.py: test files import these names directly, and
``from conftest import ...`` would pick up whichever of the suite's several
conftest.py files was imported first.
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from safepoint.ondisk.manifest import _body_digest
from safepoint.storage.local import LocalStorage


class FaultyStorage(LocalStorage):
    """Raises EIO once at ``stage_to_fail`` when armed; records every stage it passes.

    Every write path of the local backend calls ``_fault(stage, target)`` first, so
    setting ``stage_to_fail`` to "write", "fsync", "manifest", "rename"... fails the
    next call of that stage, and only that one (the device then "recovers").
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.stage_to_fail: str | None = None
        self.hits: list[tuple[str, str]] = []

    def _fault(self, stage: str, target: str) -> None:
        self.hits.append((stage, target))
        if stage == self.stage_to_fail:
            self.stage_to_fail = None
            raise OSError(errno.EIO, "Input/output error (injected)")


def tensor_bytes(value: Any) -> bytes:
    """The raw bytes of a torch tensor (any dtype, contiguous copy)."""
    import torch

    flat = value.detach().clone(memory_format=torch.contiguous_format).reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return bytes(flat.numpy())


def _payload_bytes(arr: np.ndarray) -> bytes:
    """The bytes of ``arr`` that carry its values (x87 long doubles have 6 pad bytes)."""
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("=")))
    padded = (np.dtype(np.longdouble), np.dtype(np.clongdouble))
    if np.dtype(np.longdouble).itemsize == 16 and arr.dtype in padded:
        return arr.reshape(-1).view(np.uint8).reshape(-1, 16)[:, :10].tobytes()
    return arr.tobytes()


def _short(key: object) -> str:
    """A printable key (ints past the str digit limit cannot be repr'd)."""
    if isinstance(key, int) and key.bit_length() > 4096:
        return f"<int of {key.bit_length()} bits>"
    return repr(key)


def assert_same(expected: Any, actual: Any, path: str = "<root>") -> None:
    """Assert ``actual`` is ``expected`` rebuilt exactly: same types, keys, bytes.

    Floats compare by bits (NaN equals NaN, -0.0 differs from 0.0), arrays and
    tensors by dtype, shape and raw bytes, containers by exact type.
    """
    if isinstance(expected, np.generic):
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert _payload_bytes(np.asarray(actual)) == _payload_bytes(np.asarray(expected)), path
        return
    if isinstance(expected, np.ndarray):
        assert type(actual) is np.ndarray, f"{path}: {type(actual)}"
        assert actual.dtype == expected.dtype.newbyteorder("="), path
        assert actual.shape == expected.shape, path
        assert _payload_bytes(actual) == _payload_bytes(expected), path
        return
    if type(expected).__module__ == "torch" and type(expected).__name__ == "Tensor":
        assert type(actual) is type(expected), f"{path}: {type(actual)}"
        assert actual.dtype == expected.dtype, path
        assert actual.shape == expected.shape, path
        assert actual.requires_grad == expected.requires_grad, path
        assert tensor_bytes(actual) == tensor_bytes(expected), path
        return
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), path
        else:
            assert actual == expected, path
            assert math.copysign(1.0, actual) == math.copysign(1.0, expected), path
    elif isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys()), path
        for k in expected:
            where = f"{path}/{_short(k)}"
            assert type(next(x for x in actual if x == k)) is type(k), where
            assert_same(expected[k], actual[k], where)
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{path}/{i}")
    else:
        assert actual == expected, path


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """A checkpoint's manifest as a plain JSON object."""
    return json.loads((ckpt_dir / "manifest.json").read_text())


def write_manifest(ckpt_dir: Path, body: dict[str, Any], *, sign: bool = True) -> None:
    """Write ``body`` as the manifest, re-signed so only deeper validation can reject it."""
    if sign:
        body["checksum"] = _body_digest(body)
    (ckpt_dir / "manifest.json").write_text(json.dumps(body, indent=1))


def listing(root: Path) -> set[str]:
    """Every entry of a checkpoint root, hidden ones included."""
    return set(os.listdir(root)) if root.exists() else set()
