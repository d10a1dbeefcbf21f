"""A whole state tree in one zip file: ``state.json`` and ``tensors.bin``, stored.

The single-file form of a safepoint checkpoint, for frameworks whose users expect one
file per checkpoint (Lightning's ``.ckpt``): the state tree as safepoint's JSON (the
tree codec of :mod:`safepoint.state.tree`, so nothing is pickled) and every tensor's
bytes in one entry, each at a 64-byte aligned offset. The zip is stored, not
compressed. :func:`safepoint.ondisk.embedded.seal` then adds safepoint's manifest as
one more entry, recording each entry's size and xxh3, so that the file is verified
before anything in it is parsed.

Layout ``"tree-zip"`` in the manifest's single-file record says a file is one of these.
"""

from __future__ import annotations

import json
import math
import zipfile
from typing import Any

import numpy as np

from safepoint.errors import CorruptCheckpointError
from safepoint.formats import materialize
from safepoint.ondisk.manifest import MAX_BYTES, no_duplicates
from safepoint.ondisk.records import layout_problem
from safepoint.state import dtypes
from safepoint.state.tree import flatten, tensor_refs, unflatten

LAYOUT = "tree-zip"
STATE_ENTRY = "state.json"
TENSORS_ENTRY = "tensors.bin"
FORMAT = "safepoint-tree-zip"
_ALIGN = 64
_PAD = bytes(_ALIGN)


def _aligned(pos: int) -> int:
    return -(-pos // _ALIGN) * _ALIGN


def write(path: str, state: Any) -> None:
    """Write ``state`` (any tree the codec takes) as a tree zip at ``path``.

    A value the codec cannot encode raises ``ConfigError`` naming its key path,
    before anything is written.
    """
    tree, leaves = flatten(state)
    tensors: dict[str, dict[str, Any]] = {}
    pos = 0
    for leaf in leaves:
        pos = _aligned(pos)
        tensors[leaf.key] = {**leaf.entry(), "offset": pos}
        pos += leaf.nbytes
    body = {"format": FORMAT, "version": 1, "tree": tree, "tensors": tensors, "size": pos}
    text = json.dumps(body, allow_nan=False).encode()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr(STATE_ENTRY, text)
        with z.open(TENSORS_ENTRY, "w", force_zip64=True) as f:
            at = 0
            for leaf in leaves:
                gap = _aligned(at) - at
                f.write(_PAD[:gap])
                at += gap
                data = leaf.buffer()
                f.write(data)
                at += data.nbytes


def _fail(name: str, why: str, received: Any = None) -> CorruptCheckpointError:
    text = repr(received)
    text = text if len(text) <= 120 else text[:117] + "..."
    return CorruptCheckpointError(
        f"{name}: the state in this file is malformed: {why}. Received: {text}. The file "
        "was altered after safepoint sealed it; use another checkpoint.",
        file=name,
    )


def _check_entry(name: str, key: str, entry: Any, size: int) -> int:
    """Validate one tensor record against the tensor bytes' size; return its length."""
    if not isinstance(entry, dict):
        raise _fail(name, "a tensor record is not an object", entry)
    dt = dtypes.lookup(entry.get("dtype"), where=f"{name} tensor {key!r}")
    problem = layout_problem(key, entry)
    if problem is not None:
        raise _fail(name, *problem)
    shape, offset = entry["shape"], entry.get("offset")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise _fail(name, f"tensor {key!r} has a bad offset", offset)
    length = math.prod(shape) * dt.itemsize
    if offset + length > size:  # also refuses a shape bomb before any allocation
        raise _fail(name, f"tensor {key!r} lies outside the tensor bytes", [offset, length])
    return length


def read(name: str, state_json: bytes, tensor_bytes: bytes, *, as_numpy: bool = True) -> Any:
    """Rebuild the state from a tree zip's two entries (already size- and
    checksum-verified against the file's manifest)."""
    if len(state_json) > MAX_BYTES:
        raise _fail(name, f"{STATE_ENTRY} is larger than {MAX_BYTES} bytes", len(state_json))
    try:
        body = json.loads(state_json, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise _fail(name, f"{STATE_ENTRY} is not JSON", str(exc)) from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise _fail(name, f"{STATE_ENTRY} is not a safepoint state", type(body).__name__)
    tensors = body.get("tensors")
    if not isinstance(tensors, dict):
        raise _fail(name, "the tensor records are not an object", tensors)
    buffer = np.frombuffer(bytearray(tensor_bytes), dtype=np.uint8)  # writable, owned
    spans = {k: (e["offset"], _check_entry(name, k, e, buffer.size)) for k, e in tensors.items()}
    tree = body.get("tree")
    for ref in tensor_refs(tree):
        if ref not in tensors:
            raise _fail(name, "the state tree references an unknown tensor", ref)

    def tensor(key: str) -> Any:
        start, length = spans[key]
        return materialize(tensors[key], buffer[start : start + length], as_numpy=as_numpy)

    return unflatten(tree, tensor)


__all__ = ["FORMAT", "LAYOUT", "STATE_ENTRY", "TENSORS_ENTRY", "read", "write"]
