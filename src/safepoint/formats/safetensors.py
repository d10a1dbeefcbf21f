"""The default payload: plain safetensors files, streamed from the tensors' own buffers.

Layout (the safetensors spec): an 8-byte little-endian header length, a JSON header
padded with spaces to a multiple of 8, then every tensor's bytes back to back. The
writer builds only the header in memory and hands the tensor buffers themselves to
``writev`` (no copy of the state), hashing them on the way; an async save's staged
file image (header and tensors already in place) is written as it is. Any
``safetensors.safe_open`` can read the result.

The reader trusts nothing: the header length is bounded by the file size, every
entry's dtype must be in the allow-list, its shape must account for exactly the
bytes its offsets span, and the entries must tile the data region with no gap or
overlap. Only then is memory allocated, tensor by tensor, and filled with
``readinto`` while the checksum is computed over the same bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from safepoint.errors import ConfigError
from safepoint.formats import Files, Locations, expect, shards
from safepoint.ondisk import checksum
from safepoint.ondisk.manifest import (
    CONTAINER_COST,
    MAX_DIMS,
    MAX_PARSE_COST,
    MEMBER_COST,
    Manifest,
    no_duplicates,
    parse_cost,
)
from safepoint.state import dtypes
from safepoint.state.tree import TensorLeaf
from safepoint.storage import parallel, payload_read, payload_write
from safepoint.storage.files import translate_read
from safepoint.storage.protocol import LocalFiles, Storage

#: Payload files of one checkpoint read at once from a store without local files, when
#: each is at most ``SMALL_FILE`` bytes.
FILES_IN_FLIGHT, SMALL_FILE = 8, 64 << 20

MAX_HEADER = 100 << 20
_METADATA_MEMBERS = 64  # "__metadata__": a few string pairs (safepoint writes two)


def _layout(dtype_name: str, shape: Sequence[int]) -> tuple[dtypes.DType, tuple[int, ...]]:
    dt = dtypes.BY_NAME[dtype_name]
    return dtypes.payload_layout(dt, tuple(shape), native=dt.safetensors is not None)


def header_bytes(leaves: Sequence[TensorLeaf]) -> bytes:
    """The length prefix and padded JSON header describing ``leaves`` in order."""
    header: dict[str, Any] = {"__metadata__": {"writer": "safepoint", "format": "pt"}}
    offset = 0
    for leaf in leaves:
        dt, shape = _layout(leaf.dtype.name, leaf.shape)
        header[leaf.key] = {
            "dtype": dt.safetensors,
            "shape": list(shape),
            "data_offsets": [offset, offset + leaf.nbytes],
        }
        offset += leaf.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsFormat:
    name = "safetensors"
    suffix = ".safetensors"
    lazy = True

    def image_prefix(self, leaves: Sequence[TensorLeaf]) -> bytes:
        """The bytes before the tensors in the file of ``leaves`` (async staging lays
        its memory out as the file, so the writer can skip a copy; see staging.py)."""
        return header_bytes(leaves)

    def write(
        self,
        storage: Storage,
        staged: str,
        leaves: Sequence[TensorLeaf],
        *,
        shard_bytes: int,
        images: Sequence[np.ndarray] | None = None,
    ) -> tuple[Files, Locations]:
        """Write one file per shard; ``images`` are the shards' whole files, if staged."""
        files: Files = {}
        locations: Locations = {}
        groups = list(shards(leaves, shard_bytes))
        if images is not None and len(images) != len(groups):
            raise ValueError(f"{len(images)} staged images for {len(groups)} shards")
        for index, group in enumerate(groups):
            fname = f"model-{index:05d}{self.suffix}"
            path = f"{staged}/{fname}"
            if images is None:
                size, digest = self._write_file(storage, path, group)
            else:
                size, digest = self._write_image(storage, path, group, images[index])
            files[fname] = {"size": size, checksum.ALGORITHM: digest}
            for leaf in group:
                locations[leaf.key] = {"file": fname, "name": leaf.key}
        return files, locations

    def _write_file(
        self, storage: Storage, relpath: str, leaves: Sequence[TensorLeaf]
    ) -> tuple[int, str]:
        head = header_bytes(leaves)
        total = len(head) + sum(leaf.nbytes for leaf in leaves)
        stream = payload_write.PayloadStream(storage.open_write(relpath), size_hint=total)
        try:
            stream.write(memoryview(head))
            for leaf in leaves:
                buf = leaf.buffer()
                if buf.nbytes != leaf.nbytes:
                    raise _changed(leaf.key, leaf.nbytes, buf.nbytes)
                stream.write(buf)
        except BaseException:
            stream.abort()
            raise
        size, digest = stream.close()
        if size != total:
            raise _changed(relpath, total, size)
        return size, digest

    def _write_image(
        self, storage: Storage, relpath: str, leaves: Sequence[TensorLeaf], image: np.ndarray
    ) -> tuple[int, str]:
        """Write a staged file image as it is: page-aligned, so without a copy."""
        head = header_bytes(leaves)
        total = len(head) + sum(leaf.nbytes for leaf in leaves)
        if image.nbytes != total or image[: len(head)].tobytes() != head:
            raise ValueError(f"the staged image of {relpath} does not match its tensors")
        stream = payload_write.PayloadStream(storage.open_write(relpath), size_hint=total)
        try:
            stream.write(image.data)
        except BaseException:
            stream.abort()
            raise
        return stream.close()

    def read(
        self, storage: Storage, ckpt: str, manifest: Manifest, *, lazy: bool = False
    ) -> dict[str, np.ndarray]:
        """Every tensor's bytes by key, checksums verified.

        ``lazy=True`` returns copy-on-write views of the mapped files without reading or
        verifying the tensor bytes (headers and sizes are still validated).
        """
        by_file: dict[str, list[tuple[str, dict[str, Any]]]] = {f: [] for f in manifest.files}
        for key, entry in manifest.tensors.items():
            by_file[entry["file"]].append((key, entry))
        out: dict[str, np.ndarray] = {}

        def read_one(fname: str, info: dict[str, Any]) -> Callable[[], None]:
            def task() -> None:
                got = self._read_file(storage, f"{ckpt}/{fname}", info, by_file[fname], lazy=lazy)
                out.update(got)  # one dict update: atomic under the GIL

            return task

        files = manifest.files.items()
        if isinstance(storage, LocalFiles):  # read (or mapped) at memory speed, in turn
            parallel.run_all([read_one(f, info) for f, info in files], 1)
            return out
        # On an object store each file costs round trips (a HEAD, then GETs): a dedup
        # checkpoint of hundreds of one-tensor blobs would pay them in sequence. Large
        # files already have their ranges in flight at once; they are read in turn, by
        # one of the workers, while the others read the small ones.
        small = [read_one(f, info) for f, info in files if int(info["size"]) <= SMALL_FILE]
        large = [read_one(f, info) for f, info in files if int(info["size"]) > SMALL_FILE]

        def large_in_turn() -> None:
            for task in large:
                task()

        parallel.run_all([large_in_turn, *small] if large else small, FILES_IN_FLIGHT)
        return out

    def _read_file(
        self,
        storage: Storage,
        relpath: str,
        info: dict[str, Any],
        wanted: list[tuple[str, dict[str, Any]]],
        *,
        lazy: bool = False,
    ) -> dict[str, np.ndarray]:
        expected_size = int(info["size"])
        with translate_read(relpath):
            actual_size = storage.size(relpath)
        checksum.check_size(relpath, expected=expected_size, actual=actual_size)
        try:
            # The size is bounded by the manifest and by the file itself, so this
            # allocation is no larger than what is really stored.
            image, digest = payload_read.read_payload(storage, relpath, actual_size, lazy=lazy)
        except EOFError as exc:
            expect(False, relpath, "file ended early", expected=actual_size, actual=str(exc))
        if digest is not None:  # None: a lazy mapping, whose bytes are read when touched
            checksum.check(relpath, expected=info[checksum.ALGORITHM], actual=digest)
        expect(actual_size >= 8, relpath, "file ended early", expected=8, actual=actual_size)
        (hlen,) = struct.unpack("<Q", image[:8].tobytes())
        expect(
            8 + hlen <= actual_size and hlen <= MAX_HEADER,
            relpath,
            "header length exceeds the file",
            expected=actual_size - 8,
            actual=hlen,
        )
        entries = parse_header(
            image[8 : 8 + hlen].tobytes(),
            relpath,
            data_len=actual_size - 8 - hlen,
            tensors=len(wanted),
        )
        wanted_by_name = {entry["name"]: (key, entry) for key, entry in wanted}
        data = image[8 + hlen :]
        out: dict[str, np.ndarray] = {}
        for name, (begin, end) in entries:
            if name not in wanted_by_name:
                continue
            key, entry = wanted_by_name[name]
            header_entry = entries.meta[name]
            dt, shape = _layout(entry["dtype"], entry["shape"])
            expect(
                header_entry["dtype"] == dt.safetensors and tuple(header_entry["shape"]) == shape,
                relpath,
                f"tensor {name!r} differs from the manifest",
                expected=(dt.safetensors, shape),
                actual=(header_entry["dtype"], header_entry["shape"]),
            )
            out[key] = data[begin:end]
        missing = set(wanted_by_name) - set(entries.meta)
        expect(
            not missing,
            relpath,
            "tensors listed in the manifest are absent",
            expected=sorted(missing),
            actual=None,
        )
        return out


class _Entries(list[tuple[str, tuple[int, int]]]):
    meta: dict[str, dict[str, Any]]


def parse_header(
    raw: bytes, relpath: str, *, data_len: int, tensors: int | None = None
) -> _Entries:
    """Validate a safetensors header; return ``(name, (begin, end))`` sorted by offset.

    ``tensors``: how many tensors the manifest puts in this file. The parse may then
    build only what so many entries need (an object and two short arrays each), so
    a header within the size cap cannot parse into gigabytes of Python objects.
    """
    if tensors is None:
        limits = (MAX_PARSE_COST // CONTAINER_COST, MAX_PARSE_COST // MEMBER_COST)
    else:
        limits = (3 * tensors + 2, (8 + MAX_DIMS) * tensors + _METADATA_MEMBERS)
    cost = parse_cost(raw, lambda c, m: c <= limits[0] and m <= limits[1])
    expect(
        cost is None,
        relpath,
        "header holds more JSON than its tensors need",
        expected=limits,
        actual=cost,
    )
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        expect(
            False, relpath, "header is not valid JSON", expected="JSON object", actual=str(exc)[:80]
        )
    expect(
        isinstance(header, dict),
        relpath,
        "header is not an object",
        expected="object",
        actual=type(header).__name__,
    )
    entries = _Entries()
    entries.meta = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        expect(isinstance(entry, dict), relpath, f"entry {name!r} is not an object")
        code = entry.get("dtype")
        expect(
            isinstance(code, str) and code in dtypes.BY_SAFETENSORS,
            relpath,
            f"entry {name!r} has a dtype outside the allow-list",
            expected=sorted(dtypes.BY_SAFETENSORS),
            actual=code,
        )
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        expect(
            isinstance(shape, list)
            and len(shape) <= 64
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape),
            relpath,
            f"entry {name!r} has a bad shape",
            actual=shape,
        )
        expect(
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1],
            relpath,
            f"entry {name!r} has bad offsets",
            actual=offsets,
        )
        nbytes = math.prod(shape) * dtypes.BY_SAFETENSORS[code].itemsize
        expect(
            nbytes == offsets[1] - offsets[0],
            relpath,
            f"entry {name!r}: shape x itemsize does not match its byte span",
            expected=nbytes,
            actual=offsets[1] - offsets[0],
        )
        entries.append((name, (offsets[0], offsets[1])))
        entries.meta[name] = entry
    entries.sort(key=lambda e: e[1])
    position = 0
    for name, (begin, end) in entries:
        expect(
            begin == position,
            relpath,
            f"entry {name!r} leaves a gap or overlaps",
            expected=position,
            actual=begin,
        )
        position = end
    expect(
        position == data_len,
        relpath,
        "tensors do not cover the data region exactly",
        expected=data_len,
        actual=position,
    )
    return entries


def _changed(what: str, expected: int, actual: int) -> ConfigError:
    return ConfigError(
        f"The state changed while it was being saved: {what} holds {actual} bytes. Expected "
        f"{expected}. Received: a tensor resized or replaced during save(). Do not modify the "
        "state from another thread until save() returns."
    )


__all__ = ["MAX_HEADER", "SafetensorsFormat", "header_bytes", "parse_header"]
