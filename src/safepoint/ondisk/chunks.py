"""Chunked tensors in the manifest: one tensor stored as boxes written by several ranks.

A multi-rank save (:mod:`safepoint.distributed`) writes each tensor as *chunks*: the
local shards of a ``DTensor``, or the one copy of a replicated tensor. Its manifest
entry then has, instead of ``file``/``name``, a ``chunks`` list; each chunk is a box of
the global tensor (``offsets``, ``sizes``, one per dimension) stored row-major in
bytes ``[begin, end)`` of one payload ``file``, with its own ``xxh3``, so that a rank
restoring onto another world size reads and verifies only the chunks it overlaps.

Validation refuses what could make a reader allocate, read or write out of bounds:
negative or non-integer numbers, boxes outside the global shape, byte ranges whose
length is not the box's size or that end past the file, overlapping boxes, and boxes
that do not cover the tensor exactly. Manifests without ``chunks`` are unaffected.
"""

from __future__ import annotations

import math
from typing import Any

from safepoint.ondisk import checksum

KEY = "chunks"
#: Chunks of one tensor: a world of this many ranks is far beyond any real job, and the
#: pairwise overlap check stays cheap below it.
MAX_CHUNKS = 4096


def is_chunked(entry: Any) -> bool:
    """True when a tensor entry stores its bytes as chunks."""
    return isinstance(entry, dict) and KEY in entry


def _uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def problem(entry: dict[str, Any], files: dict[str, Any], itemsize: int) -> str | None:
    """Why ``entry``'s chunks are unsafe to read, or None when they are sound."""
    shape = entry["shape"]
    chunks = entry.get(KEY)
    if not isinstance(chunks, list) or len(chunks) > MAX_CHUNKS:
        return f"chunks must be a list of at most {MAX_CHUNKS} objects"
    boxes: list[tuple[list[int], list[int]]] = []
    for chunk in chunks:
        if not isinstance(chunk, dict):
            return "each chunk must be an object"
        offsets, sizes = chunk.get("offsets"), chunk.get("sizes")
        if not isinstance(offsets, list) or not isinstance(sizes, list):
            return "chunk offsets and sizes must be lists"
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            return "chunk offsets and sizes need one number per dimension"
        if not all(_uint(v) for v in offsets + sizes):
            return "chunk offsets and sizes must be non-negative integers"
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            return "a chunk reaches past the tensor's shape"
        fname, begin, end = chunk.get("file"), chunk.get("begin"), chunk.get("end")
        if not isinstance(fname, str) or fname not in files:
            return "a chunk lives in an unlisted file"
        if not isinstance(begin, int) or not isinstance(end, int):
            return "chunk byte ranges must be integers"
        if not _uint(begin) or not _uint(end) or end < begin:
            return "chunk byte ranges must be non-negative with begin <= end"
        if end - begin != math.prod(sizes) * itemsize:
            return "a chunk's byte range does not match its box"
        if end > files[fname]["size"]:
            return "a chunk's byte range reaches past its file"
        digest = chunk.get(checksum.ALGORITHM)
        if not isinstance(digest, str) or len(digest) != 16:
            return f"each chunk needs a {checksum.ALGORITHM} digest"
        boxes.append((offsets, sizes))
    for i, (oa, sa) in enumerate(boxes):
        for ob, sb in boxes[i + 1 :]:
            if all(
                max(a, b) < min(a + x, b + y) for a, x, b, y in zip(oa, sa, ob, sb, strict=True)
            ):
                return "two chunks overlap"
    # Disjoint boxes inside the shape whose volumes add up to it cover it exactly.
    if sum(math.prod(s) for _, s in boxes) != math.prod(shape):
        return "the chunks do not cover the tensor exactly"
    return None


__all__ = ["KEY", "MAX_CHUNKS", "is_chunked", "problem"]
