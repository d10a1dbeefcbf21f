"""The manifest: a checkpoint's commit record, and its validation.

``manifest.json`` is written last inside the staging directory; a checkpoint whose
manifest is absent was never committed. It records the order (``seq``, monotonic per
root), step, epoch, metrics, the state tree with tensor references, where each tensor
lives, and each payload file's size and checksum. The manifest checksums itself (an
xxh3 of its canonical JSON without the ``checksum`` field), so a flipped digit in a
shape or offset is caught, not trusted.

Parsing validates everything before anything is allocated: sizes, shapes, dtypes
from the allow-list, file names confined to the checkpoint directory, nesting depth,
duplicate keys. A manifest from a newer format version is refused with
``IncompatibleCheckpointError`` rather than misread.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from safepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.ondisk import checksum, chunks, records
from safepoint.ondisk.names import BLOB_KEY_RE, component_problem
from safepoint.ondisk.records import LIBS, MAX_DIMS, layout_problem, tensor_nbytes
from safepoint.state import metrics as metriccodec
from safepoint.state.tree import tensor_refs
from safepoint.version import __version__

NAME = "manifest.json"
FORMAT = "safepoint"
FORMAT_VERSION = 1
MAX_BYTES = 64 << 20
#: Python memory a manifest's parse may build, estimated from its JSON (see
#: :func:`parse_cost`): each object or array as ~200 bytes (a small dict is ~180),
#: each member as 32 (a pointer and a float, or a dict slot). The largest real
#: manifests within ``MAX_BYTES`` (~360k tensors, or a list of 13M small ints in the
#: state) estimate below 450 MiB; a hostile one may then cost that, not gigabytes.
MAX_PARSE_COST = 512 << 20
CONTAINER_COST, MEMBER_COST = 200, 32
_SCAN = 8 << 20  # bytes per step of parse_cost's exact count
PAYLOADS = ("safetensors", "hdf5")

log = logging.getLogger("safepoint")


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated commit record of one checkpoint."""

    name: str
    seq: int
    step: int | None
    epoch: int | None
    created: float
    metrics: dict[str, Any]
    tree: Any
    tensors: dict[str, dict[str, Any]]
    files: dict[str, dict[str, Any]]
    payload: str = "safetensors"
    library_version: str = __version__
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = {
            "format": FORMAT,
            "format_version": self.format_version,
            "library_version": self.library_version,
            "name": self.name,
            "seq": self.seq,
            "step": self.step,
            "epoch": self.epoch,
            "created": self.created,
            "metrics": _encode_metric(self.metrics),
            "payload": self.payload,
            "files": self.files,
            "tensors": self.tensors,
            "tree": self.tree,
            "extra": self.extra,
        }
        body["checksum"] = _body_digest(body)
        return body

    def to_bytes(self) -> bytes:
        # Not sort_keys: the state tree's dicts must come back in the user's key order
        # (the checksum is over a sorted canonical form, so it does not depend on it).
        return (json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n").encode()

    def nbytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())


def _encode_metric(metrics: dict[str, Any]) -> Any:
    # Metrics are user data with their own codec (any name, any number), never the
    # state tree's, which reads "$" names as tags (see metriccodec.py).
    return metriccodec.encode(metrics)


def _body_digest(body: dict[str, Any]) -> str:
    rest = {k: v for k, v in body.items() if k != "checksum"}
    canon = json.dumps(
        rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    # surrogatepass: a str holding a lone surrogate (os.fsdecode of an undecodable file
    # name) is valid state; the manifest file escapes it, and the digest must not choke.
    return checksum.digest_bytes(canon.encode("utf-8", "surrogatepass"))


def now() -> float:
    return round(time.time(), 6)


# ---------------------------------------------------------------------------- parsing
def _fail(where: str, why: str, received: Any = None) -> CorruptCheckpointError:
    text = repr(received)
    if len(text) > 120:
        text = text[:117] + "..."
    return CorruptCheckpointError(
        f"Invalid manifest {where}: {why}. Received: {text}. It was not written by safepoint "
        "or was damaged; restore another checkpoint (restore('latest') skips it).",
        file=where,
        expected=why,
        actual=received,
    )


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


def _int(value: Any, where: str, what: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(where, f"{what} must be a non-negative integer", value)
    return value


def parse_cost(data: bytes, within: Callable[[int, int], bool]) -> tuple[int, int] | None:
    """The containers and members ``json.loads(data)`` would build, unless ``within``.

    A few bytes of ``[],`` or ``{"a":0},`` each become an object of 50-400 bytes, so
    a file within the byte cap could otherwise parse into gigabytes. Counted before
    parsing: first every bracket and separator (an upper bound, fast), and only when
    ``within(containers, members)`` refuses those, the ones outside strings (a JSON
    parse stops at its first error, so text past it does not matter). Returns None
    when the parse is within bounds.
    """
    containers = data.count(b"{") + data.count(b"[")
    members = data.count(b",") + data.count(b":")
    if within(containers, members):
        return None
    text = np.frombuffer(data.replace(b"\\\\", b"").replace(b'\\"', b""), dtype=np.uint8)
    containers = members = inside = 0
    for begin in range(0, len(text), _SCAN):
        chunk = text[begin : begin + _SCAN]
        parity = np.cumsum(chunk == ord('"'), dtype=np.uint8)  # wraps: parity survives
        parity += inside
        outside = (parity & 1) == 0
        containers += int(np.count_nonzero(outside & ((chunk == ord("{")) | (chunk == ord("[")))))
        members += int(np.count_nonzero(outside & ((chunk == ord(",")) | (chunk == ord(":")))))
        inside = int(parity[-1]) & 1
    return None if within(containers, members) else (containers, members)


def _affordable(containers: int, members: int) -> bool:
    return containers * CONTAINER_COST + members * MEMBER_COST <= MAX_PARSE_COST


#: Manifests parsed lately, by their exact bytes: a restore lists the root (parsing
#: every manifest) and then reads the chosen checkpoint's manifest again from the
#: version it holds open. Same bytes, same manifest: the second parse is a lookup.
#: Bounded by count and by the bytes held as keys, so a root of very large manifests
#: cannot make a long-running process keep a gigabyte of them.
_PARSED: OrderedDict[bytes, Manifest] = OrderedDict()
_PARSED_MAX = 16
_PARSED_MAX_BYTES = 16 << 20
_PARSED_LOCK = threading.Lock()


def parse(data: bytes, *, where: str) -> Manifest:
    """Validate and parse manifest bytes; raise Corrupt/Incompatible errors, nothing else.

    A manifest's bytes parsed before return the same (frozen) :class:`Manifest`, whose
    dicts callers treat as read-only.
    """
    with _PARSED_LOCK:
        found = _PARSED.get(data)
        if found is not None:
            _PARSED.move_to_end(data)
            return found
    found = _parse(data, where=where)
    if len(data) > _PARSED_MAX_BYTES:
        return found  # too large to keep: parsed again if read again
    with _PARSED_LOCK:
        _PARSED[data] = found
        while len(_PARSED) > _PARSED_MAX or sum(map(len, _PARSED)) > _PARSED_MAX_BYTES:
            _PARSED.popitem(last=False)
    return found


def _parse(data: bytes, *, where: str) -> Manifest:
    if len(data) > MAX_BYTES:
        raise _fail(where, f"larger than {MAX_BYTES} bytes", len(data))
    cost = parse_cost(data, _affordable)
    if cost is not None:
        raise _fail(
            where,
            f"too many JSON objects/arrays and members to parse within {MAX_PARSE_COST >> 20} MiB",
            cost,
        )
    try:
        body = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=no_duplicates,
            parse_constant=_reject_constant,
        )
    except RecursionError:
        raise _fail(where, "nesting too deep", "...") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(where, f"not valid JSON ({exc})", data[:60]) from None
    if not isinstance(body, dict):
        raise _fail(where, "not a JSON object", body)
    if body.get("format") != FORMAT:
        raise IncompatibleCheckpointError(
            f"{where} is not a safepoint manifest. Expected format={FORMAT!r}. Received: "
            f"format={body.get('format')!r}. Use the tool that wrote it, or "
            "'safepoint convert' for formats safepoint can import."
        )
    version = body.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _fail(where, "format_version must be a positive integer", version)
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{where} uses checkpoint format version {version}. Expected at most "
            f"{FORMAT_VERSION}. Received: a checkpoint from safepoint "
            f"{body.get('library_version')!r}. Upgrade safepoint to read it."
        )
    if body.get("checksum") != _body_digest(body):
        raise _fail(where, "manifest checksum does not match its contents", body.get("checksum"))
    return _from_body(body, where)


def _from_body(body: dict[str, Any], where: str) -> Manifest:
    name = body.get("name")
    if component_problem(name):
        raise _fail(where, "name is not a safe checkpoint name", name)
    seq = _int(body.get("seq"), where, "seq")
    step = _int(body.get("step"), where, "step", optional=True)
    epoch = _int(body.get("epoch"), where, "epoch", optional=True)
    created = body.get("created")
    if (
        isinstance(created, bool)
        or not isinstance(created, int | float)
        or not math.isfinite(created)
    ):
        raise _fail(where, "created must be a number", created)
    payload = body.get("payload")
    if payload not in PAYLOADS:
        raise _fail(where, f"payload must be one of {PAYLOADS}", payload)
    metrics = _decode_metrics(body.get("metrics"), where)
    files = body.get("files")
    if not isinstance(files, dict):
        raise _fail(where, "files must be an object", files)
    for fname, info in files.items():
        if component_problem(fname) or fname == NAME:
            raise _fail(where, "file names must stay inside the checkpoint", fname)
        if not isinstance(info, dict):
            raise _fail(where, "file entries must be objects", info)
        _int(info.get("size"), where, f"size of {fname}")
        digest = info.get(checksum.ALGORITHM)
        if not isinstance(digest, str) or len(digest) != 16:
            raise _fail(where, f"{fname} needs a {checksum.ALGORITHM} digest", digest)
        blob = info.get("blob")  # optional: the file is a shared blob (docs/dedup.md)
        if blob is not None and (not isinstance(blob, str) or not BLOB_KEY_RE.match(blob)):
            raise _fail(where, f"{fname} has a blob key that is not 32 lowercase hex", blob)
    tensors = body.get("tensors")
    if not isinstance(tensors, dict):
        raise _fail(where, "tensors must be an object", tensors)
    per_file: dict[str, int] = {}
    for key, entry in tensors.items():
        problem = records.tensor_problem(key, entry, files, where)
        if problem is not None:
            raise _fail(where, *problem)
        if chunks.is_chunked(entry):  # a multi-rank save's tensor: checked by its chunks
            continue
        per_file[entry["file"]] = per_file.get(entry["file"], 0) + tensor_nbytes(entry)
    for fname, total in per_file.items():
        # A shape bomb declares more elements than the file can hold: refuse it here,
        # before anything is allocated for it.
        if total > files[fname]["size"]:
            raise _fail(where, f"tensors in {fname} declare more bytes than the file holds", total)
    tree = body.get("tree")
    for ref in tensor_refs(tree):
        if ref not in tensors:
            raise _fail(where, "the state tree references an unknown tensor", ref)
    extra = body.get("extra", {})
    if not isinstance(extra, dict):
        raise _fail(where, "extra must be an object", extra)
    return Manifest(
        name=str(name),
        seq=seq or 0,
        step=step,
        epoch=epoch,
        created=float(created),
        metrics=metrics,
        tree=tree,
        tensors=tensors,
        files=files,
        payload=payload,
        library_version=str(body.get("library_version", "")),
        format_version=body["format_version"],
        extra=extra,
    )


def _decode_metrics(node: Any, where: str) -> dict[str, Any]:
    """The checkpoint's metrics, or ``{}`` with a warning when they do not decode.

    Damaged metrics (the manifest checksum matched, so a writer put them there) cost
    that checkpoint its metrics, never its listing: its tensors are intact.
    """
    try:
        return metriccodec.decode(node)
    except metriccodec.MetricsError as exc:
        log.warning("safepoint: %s: listing it without metrics: %s", where, exc)
        return {}


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LIBS",
    "MAX_BYTES",
    "MAX_DIMS",
    "MAX_PARSE_COST",
    "NAME",
    "PAYLOADS",
    "Manifest",
    "layout_problem",
    "no_duplicates",
    "now",
    "parse",
    "parse_cost",
    "tensor_nbytes",
]
