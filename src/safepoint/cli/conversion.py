"""Converting a checkpoint between payload formats (safetensors <-> HDF5).

The source may be in a bucket (``s3://...``): conversion is then also the way to bring
a checkpoint to a local disk, verified on the way.

Conversion works on raw bytes: each tensor is read and verified, then written under the
same key, dtype and shape by the other format, so no value passes through a float
conversion and no framework is imported. The result is committed with the same
protocol as a save (staged in the destination root, fsynced, renamed into place).

A single-file Keras checkpoint (``.keras``, ``.h5``, ``.weights.h5`` written by
safepoint) converts to a checkpoint directory holding its weights by HDF5 path.

Pickle files (``torch.save`` outputs, ``.pt``/``.pth``/``.ckpt``/``.bin``) are never
opened: loading one can run arbitrary code. The error explains the safe way in.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from safepoint import formats
from safepoint.catalog import singlefile
from safepoint.catalog.directory import write_checkpoint
from safepoint.catalog.index import Catalog
from safepoint.catalog.reader import read_raw, refuse_pickle
from safepoint.catalog.series import next_seq
from safepoint.cli.report import read_weights
from safepoint.errors import ConfigError
from safepoint.state import dtypes
from safepoint.state.tree import TensorLeaf, flatten
from safepoint.storage.local import LocalStorage, Storage, check_name


def convert(src: str, dst: str, *, to: str) -> str:
    """Write local checkpoint ``src`` as a new checkpoint directory ``dst`` in format ``to``."""
    src = os.path.abspath(src).rstrip(os.sep)
    if os.path.isfile(src) and singlefile.container(src) is None:
        raise refuse_pickle(src)
    src_root, src_name = os.path.split(src)
    return convert_from(LocalStorage(src_root), src_name, dst, to=to)


def convert_from(src_storage: Storage, src_name: str, dst: str, *, to: str) -> str:
    """Write checkpoint ``src_name`` of ``src_storage`` (a local root or a bucket) as a new
    local checkpoint directory ``dst`` in format ``to``; returns ``dst``'s full path."""
    if to not in ("safetensors", "hdf5"):
        raise ConfigError(
            f"Cannot convert to {to!r}. Expected 'safetensors' or 'hdf5'. Received: --to {to}. "
            "Keras files are written by safepoint.keras.ModelCheckpoint during training."
        )
    dst = os.path.abspath(dst).rstrip(os.sep)
    dst_root, dst_name = os.path.split(dst)
    check_name(dst_name, what="output checkpoint name")
    if os.path.lexists(dst):
        raise ConfigError(
            f"Output {dst} exists. Expected a new path. Received: --out {dst}. Choose another "
            "name or remove it first."
        )
    # Manifest and payloads of one version, even while a writer re-saves the name.
    if singlefile.is_single_file(src_storage, src_name):
        # A Keras file: its verified weights, as a tree of numpy arrays by HDF5 path.
        found, weights = read_weights(src_storage, src_name)
        tree, leaves = flatten(weights)
        extra = {k: v for k, v in found.extra.items() if k != singlefile.KEY}
        found = replace(found, tree=tree, extra=extra, payload=to)
    else:
        found, raw = read_raw(src_storage, src_name)
        leaves = [
            TensorLeaf(
                key,
                _dtype(entry),
                tuple(entry["shape"]),
                entry["lib"],
                raw[key],
                bool(entry.get("requires_grad")),
            )
            for key, entry in found.tensors.items()
        ]
    fmt = formats.get(to)
    out = LocalStorage(dst_root)
    # The output may land in a live run's root: take its writer lock (so its cleanup
    # cannot remove our staging directory) and give the copy the next seq there, so
    # two listed checkpoints never share one.
    out.lock()
    try:
        seq = next_seq(Catalog(out))  # under the root's save mutex, reserved in-process
        draft = replace(found, name=dst_name, seq=seq, files={}, tensors={})
        write_checkpoint(out, fmt, draft, leaves, shard_bytes=formats.SHARD_BYTES)
    finally:
        out.unlock()
    return dst


def _dtype(entry: dict[str, Any]) -> dtypes.DType:
    return dtypes.BY_NAME[str(entry["dtype"])]


__all__ = ["convert", "convert_from"]
