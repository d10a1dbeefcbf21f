"""The HDF5 payload (``format="hdf5"``), written and read with h5py.

Each tensor is one contiguous, unfiltered dataset named ``t000000``, ``t000001``...
with its key path as an attribute; dtypes HDF5 cannot spell (bfloat16, float8,
complex32) are stored as raw bytes, exactly as in the safetensors payload.

HDF5 seeks back while writing, so the checksum is taken by reading the closed file
once more. The reader verifies that checksum over the raw bytes *before* h5py parses
anything, then refuses external links, external storage, virtual and filtered
datasets, and any dataset whose dtype, shape or stored size differs from the
manifest, before allocating its memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from safepoint.errors import StorageError
from safepoint.formats import Files, Locations, expect, shards
from safepoint.ondisk import checksum
from safepoint.ondisk.manifest import Manifest
from safepoint.state import dtypes
from safepoint.state.tree import TensorLeaf
from safepoint.storage.files import translate, translate_read
from safepoint.storage.protocol import Storage, local_path


def _layout(dtype_name: str, shape: Sequence[int]) -> tuple[np.dtype, tuple[int, ...]]:
    dt = dtypes.BY_NAME[dtype_name]
    native = dt.numpy is not None and dt.name not in ("complex32",)
    stored, stored_shape = dtypes.payload_layout(dt, tuple(shape), native=native)
    return np.dtype(stored.numpy), stored_shape


class HDF5Format:
    name = "hdf5"
    suffix = ".h5"
    lazy = False

    def write(
        self,
        storage: Storage,
        staged: str,
        leaves: Sequence[TensorLeaf],
        *,
        shard_bytes: int,
        images: Sequence[np.ndarray] | None = None,
    ) -> tuple[Files, Locations]:
        if images is not None:  # HDF5 has no image_prefix, so nothing stages images for it
            raise ValueError("the HDF5 format writes from tensors, not staged file images")
        files: Files = {}
        locations: Locations = {}
        index = 0
        for shard, group in enumerate(shards(leaves, shard_bytes)):
            fname = f"model-{shard:05d}{self.suffix}"
            relpath = f"{staged}/{fname}"
            path = local_path(storage, relpath)
            if path is None:
                raise StorageError("The hdf5 format needs a local file system root.", stage="write")
            with translate("write", path):
                with h5py.File(path, "w", libver="latest") as h5:
                    for leaf in group:
                        dset_name = f"t{index:06d}"
                        index += 1
                        np_dtype, shape = _layout(leaf.dtype.name, leaf.shape)
                        data = np.frombuffer(leaf.buffer(), dtype=np.uint8)
                        dset = h5.create_dataset(dset_name, shape=shape, dtype=np_dtype)
                        if data.size:
                            dset.write_direct(data.view(np_dtype).reshape(shape))
                        # A label for people browsing the file (the manifest maps keys to
                        # datasets); HDF5 strings must be valid UTF-8, and a key may hold a
                        # lone surrogate (os.fsdecode of an undecodable name).
                        dset.attrs["key"] = leaf.key.encode("utf-8", "surrogatepass").decode(
                            "utf-8", "replace"
                        )
                        locations[leaf.key] = {"file": fname, "name": dset_name}
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            size = storage.size(relpath)
            with storage.open_read(relpath) as f:
                digest = checksum.hash_stream(f, size, file=relpath)
            files[fname] = {"size": size, checksum.ALGORITHM: digest}
        return files, locations

    def image_prefix(self, leaves: Sequence[TensorLeaf]) -> bytes | None:
        """None: h5py lays out its own files, so async saves stage the tensors only."""
        return None

    def read(
        self, storage: Storage, ckpt: str, manifest: Manifest, *, lazy: bool = False
    ) -> dict[str, np.ndarray]:
        """Every tensor's bytes by key, checksums verified (``lazy`` is not supported)."""
        out: dict[str, np.ndarray] = {}
        for fname, info in manifest.files.items():
            relpath = f"{ckpt}/{fname}"
            with translate_read(relpath):
                size = storage.size(relpath)
            checksum.check_size(relpath, expected=int(info["size"]), actual=size)
            with storage.open_read(relpath) as f:
                checksum.check(
                    relpath,
                    expected=info[checksum.ALGORITHM],
                    actual=checksum.hash_stream(f, size, file=relpath),
                )
                f.seek(0)
                wanted = [(k, e) for k, e in manifest.tensors.items() if e["file"] == fname]
                try:
                    with h5py.File(f, "r") as h5:
                        for key, entry in wanted:
                            out[key] = _read_dataset(h5, relpath, entry)
                # h5py reports damaged metadata (a bad checksum, a corrupt B-tree) as
                # RuntimeError as well as OSError/KeyError/ValueError.
                except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
                    expect(False, relpath, "HDF5 structure is unreadable", actual=str(exc)[:120])
        return out


def _read_dataset(h5: Any, relpath: str, entry: dict[str, Any]) -> np.ndarray:
    name = entry["name"]
    link = h5.get(name, getlink=True)
    expect(
        isinstance(link, h5py.HardLink),
        relpath,
        f"{name!r} is an external or soft link",
        expected="a dataset",
        actual=type(link).__name__,
    )
    dset = h5[name]
    expect(isinstance(dset, h5py.Dataset), relpath, f"{name!r} is not a dataset")
    expect(
        dset.external is None and not dset.is_virtual,
        relpath,
        f"{name!r} uses external or virtual storage",
        expected="internal storage",
    )
    expect(
        dset.compression is None and dset.chunks is None,
        relpath,
        f"{name!r} is chunked or filtered",
        expected="contiguous",
    )
    np_dtype, shape = _layout(entry["dtype"], entry["shape"])
    expect(
        dset.dtype == np_dtype and tuple(dset.shape) == shape,
        relpath,
        f"{name!r} differs from the manifest",
        expected=(str(np_dtype), shape),
        actual=(str(dset.dtype), tuple(dset.shape)),
    )
    nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    stored = dset.id.get_storage_size()
    expect(
        stored in (nbytes, 0) if nbytes == 0 else stored == nbytes,
        relpath,
        f"{name!r} stores a different number of bytes",
        expected=nbytes,
        actual=stored,
    )
    buf = np.empty(nbytes, dtype=np.uint8)
    if nbytes:
        dset.read_direct(buf.view(np_dtype).reshape(shape))
    return buf


__all__ = ["HDF5Format"]
