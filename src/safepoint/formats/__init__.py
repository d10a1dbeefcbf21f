"""Payload formats: how tensors become bytes in a checkpoint directory.

A format writes the tensor leaves of one snapshot into one or more payload files
inside the staging directory and reports each file's size and checksum; it reads
them back as raw ``uint8`` arrays after verifying those checksums. Formats register
lazily as ``"module:Class"`` strings so that h5py is imported only by users of HDF5.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from safepoint.errors import ConfigError, CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.ondisk.manifest import Manifest
from safepoint.state import dtypes
from safepoint.state.tree import TensorLeaf
from safepoint.storage.protocol import Storage

_REGISTRY = {
    "safetensors": ("safepoint.formats.safetensors:SafetensorsFormat", None),
    "hdf5": ("safepoint.formats.hdf5:HDF5Format", "h5py (pip install 'safepoint[hdf5]')"),
}

#: Default upper bound of one payload file; larger states are split into shards.
SHARD_BYTES = 2 << 30

Files = dict[str, dict[str, Any]]
Locations = dict[str, dict[str, str]]


class PayloadFormat(Protocol):
    """How tensors become payload files: the members the manager and readers use.

    ``lazy``: whether ``read(..., lazy=True)`` can return views of the files without
    reading them (memory-mapped; only where the storage has ``LocalFiles``).
    """

    name: str
    suffix: str
    lazy: bool

    def image_prefix(self, leaves: Sequence[TensorLeaf]) -> bytes | None:
        """The bytes before a shard's tensors in its file, or None.

        A format that returns bytes can be handed ``images`` by :meth:`write`: each
        shard's complete file, laid out in page-aligned memory by the async staging,
        written without a copy. None: the format writes from the tensors themselves.
        """
        ...

    def write(
        self,
        storage: Storage,
        staged: str,
        leaves: Sequence[TensorLeaf],
        *,
        shard_bytes: int,
        images: Sequence[np.ndarray] | None = None,
    ) -> tuple[Files, Locations]:
        """Write the leaves; return ``{file: {size, digest}}`` and ``{key: {file, name}}``."""
        ...

    def read(
        self, storage: Storage, ckpt: str, manifest: Manifest, *, lazy: bool = False
    ) -> dict[str, np.ndarray]:
        """Read and verify every payload file; return each tensor's raw bytes by key.

        ``lazy`` is honoured only by formats whose ``lazy`` member is True; the others
        read and verify everything.
        """
        ...


def get(name: str) -> PayloadFormat:
    """The payload format called ``name`` (imported on first use)."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"Unknown checkpoint format. Expected one of {sorted(_REGISTRY)}. Received: "
            f"format={name!r}. Pass format='safetensors' (the default) or format='hdf5'."
        )
    target, hint = _REGISTRY[name]
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"The {name!r} format needs {hint}. Received: import error {exc}. Install it."
        ) from exc
    fmt: PayloadFormat = getattr(module, cls_name)()
    return fmt


def shards(leaves: Sequence[TensorLeaf], shard_bytes: int) -> Iterator[list[TensorLeaf]]:
    """Split leaves, in order, into groups of at most ``shard_bytes`` (at least one each)."""
    group: list[TensorLeaf] = []
    size = 0
    for leaf in leaves:
        if group and size + leaf.nbytes > shard_bytes:
            yield group
            group, size = [], 0
        group.append(leaf)
        size += leaf.nbytes
    if group or not leaves:
        yield group


def materialize(entry: dict[str, Any], raw: np.ndarray, *, as_numpy: bool = False) -> Any:
    """Turn a tensor's raw bytes into the value that was saved.

    ``lib`` decides the type: numpy arrays and scalars come back as numpy, torch
    tensors as torch tensors (on CPU) unless ``as_numpy`` asks for numpy throughout
    or the program has not loaded torch (then nothing it holds can take a tensor, and
    safepoint does not load a framework on its own).
    """
    dt = dtypes.BY_NAME[entry["dtype"]]
    shape = tuple(entry["shape"])
    lib = entry["lib"]
    torch = None if as_numpy else sys.modules.get("torch")
    if lib == "torch" and torch is not None:
        torch_dtype = getattr(torch, str(dt.torch))
        # torch.from_numpy gives an empty array stride 0, which view() to a wider dtype
        # refuses; a fresh empty uint8 tensor has stride 1.
        if raw.size and raw.ctypes.data % min(dt.itemsize, 16):
            # A payload reader may hand out a slice at any 8-byte offset; torch kernels
            # assume elements aligned to their size (a misaligned complex128 crashes).
            raw = raw.copy()
        source = torch.from_numpy(raw) if raw.size else torch.empty(0, dtype=torch.uint8)
        tensor = source.view(torch_dtype).reshape(shape)
        if entry.get("requires_grad"):
            tensor.requires_grad_(True)
        return tensor
    np_dtype = _numpy_dtype(dt)
    arr = raw.view(np_dtype).reshape(shape)
    return arr[()] if lib == "numpy-scalar" else arr


def _numpy_dtype(dt: dtypes.DType) -> np.dtype:
    if dt.numpy is not None:
        return np.dtype(dt.numpy)
    try:
        import ml_dtypes
    except ImportError:
        raise IncompatibleCheckpointError(
            f"numpy has no {dt.name} dtype. Expected a dtype numpy can hold. Received: "
            f"dtype={dt.name}. Install ml_dtypes, or load with as_numpy=False to get torch "
            "tensors."
        ) from None
    if not hasattr(ml_dtypes, dt.name):
        raise IncompatibleCheckpointError(
            f"Neither numpy nor ml_dtypes has a {dt.name} dtype. Expected a dtype numpy can "
            f"hold. Received: dtype={dt.name}. Load with as_numpy=False to get torch tensors."
        )
    return np.dtype(getattr(ml_dtypes, dt.name))


def expect(cond: bool, file: str, why: str, *, expected: Any = None, actual: Any = None) -> None:
    """Raise ``CorruptCheckpointError`` naming ``file`` unless ``cond`` holds."""
    if not cond:
        raise CorruptCheckpointError(
            f"Payload file {file} is invalid: {why}. Expected {expected!r}. Received: "
            f"{actual!r}. It was damaged or tampered with; restore another checkpoint.",
            file=file,
            expected=expected,
            actual=actual,
        )


__all__ = [
    "SHARD_BYTES",
    "Files",
    "Locations",
    "PayloadFormat",
    "expect",
    "get",
    "materialize",
    "shards",
]
