"""Names inside a checkpoint root: which are safe, which are safepoint's own.

Every name safepoint reserves is listed here, and only here:

* ``safepoint-log.jsonl`` (:data:`LOG_NAME`): the run log, in the root;
* ``manifest.json`` (:data:`MANIFEST_NAME`): a checkpoint directory's commit record,
  and ``model-NNNNN.safetensors`` / ``.h5`` (:data:`PAYLOAD_RE`) its payload files;
* ``.sp.tmp-<16 hex>`` (:data:`STAGE_RE`): a staging entry; a single file is written
  in it as ``checkpoint<suffix>`` (:data:`STAGED_FILE_STEM`);
* ``.trash-sp-<16 hex>`` (:data:`TRASH_RE`): a checkpoint on its way out (or kept
  aside during a re-save), held as :data:`TRASH_ENTRY` inside it;
* ``.safepoint-marker`` (:data:`MARKER`): what marks those two kinds of entry as ours;
* names earlier versions used and cleanup still recognises: ``<name>.tmp-<hex>``
  (:data:`OLD_STAGE_RE`), ``.trash-<name>-<hex>`` (:data:`OLD_TRASH_RE`) and
  ``.sp.tmp-<8 hex><suffix>`` staged files (:data:`OLD_STAGED_FILE_RE`).

Any name containing ``.tmp-`` (:data:`TMP_MARK`), starting with ``.`` or equal to the
log's is refused as a checkpoint name (:func:`component_problem`).

A checkpoint name, a payload file name and every component of a path read from a
manifest must be a plain single component: no separator, NUL, ``..``, hidden prefix
or staging mark. These checks run before any I/O, so a hostile manifest cannot make
safepoint read or write outside the root.
"""

from __future__ import annotations

import re

from safepoint.errors import ConfigError, CorruptCheckpointError

LOG_NAME = "safepoint-log.jsonl"
TMP_MARK = ".tmp-"
TRASH_PREFIX = ".trash-"

#: Staging and trash entries have fixed-length names (a name of up to 255 bytes, the
#: longest a checkpoint may have, could not grow a suffix): hidden, with 16 random hex
#: digits. The name they stand for is recorded in the marker file inside them.
STAGE_PREFIX = f".sp{TMP_MARK}"
TRASH_SP_PREFIX = f"{TRASH_PREFIX}sp-"
MARKER = ".safepoint-marker"
STAGE_RE = re.compile(r"^\.sp\.tmp-[0-9a-f]{16}$")
TRASH_RE = re.compile(r"^\.trash-sp-[0-9a-f]{16}$")
MANIFEST_NAME = "manifest.json"
#: The content-addressed blob store of a dedup root (see storage/blobs.py); each
#: blob is named by the 32 lowercase hex digits of its xxh3-128.
BLOBS = ".sp-blobs"
BLOB_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
PAYLOAD_RE = re.compile(r"^model-\d{5}\.(safetensors|h5)$")
STAGED_FILE_STEM = "checkpoint"
TRASH_ENTRY = "entry"
#: Names earlier versions derived from the checkpoint name (still cleaned up, carefully).
OLD_STAGE_RE = re.compile(r"^(?P<name>.+)\.tmp-[0-9a-f]{4,8}$", re.DOTALL)
OLD_TRASH_RE = re.compile(r"^\.trash-(?P<name>.+)-[0-9a-f]{4,8}$", re.DOTALL)
OLD_STAGED_FILE_RE = re.compile(r"^\.sp\.tmp-[0-9a-f]{8}(\.keras|\.weights\.h5|\.hdf5|\.h5)$")


def check_name(name: str, *, what: str = "name") -> str:
    """Return ``name`` if it is a safe single path component; ``ConfigError`` otherwise."""
    problem = component_problem(name)
    if problem:
        raise ConfigError(
            f"Invalid checkpoint {what}: {problem}. Expected a single file name of at most 255 "
            f"bytes without '/', '\\', NUL or '..', not starting with '.'. Received: "
            f"{what}={name!r}. Choose a template whose fields format to plain text."
        )
    return name


def component_problem(name: object) -> str | None:
    """Why ``name`` is not a safe path component, or None when it is."""
    if not isinstance(name, str) or not name:
        return "empty or not a string"
    if "\x00" in name or "/" in name or "\\" in name:
        return "it contains a path separator or NUL"
    if name in (".", "..") or name.startswith("."):
        return "it is a relative path marker or hidden"
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return "it is longer than 255 bytes"
    if TMP_MARK in name or name == LOG_NAME:
        return "it collides with safepoint's own staging or log names"
    return None


def split(relpath: str) -> list[str]:
    """The components of a path below the root; ``CorruptCheckpointError`` if unsafe."""
    parts = relpath.split("/")
    for index, part in enumerate(parts):
        problem = component_problem(part)
        if problem and not (
            STAGE_RE.match(part)
            or (index == 0 and part == BLOBS)
            or (TMP_MARK in part and component_problem(part.replace(TMP_MARK, "-")) is None)
        ):
            raise CorruptCheckpointError(
                f"Refusing a path that leaves the checkpoint root: {problem}. Expected a "
                f"relative path inside the root. Received: path={relpath!r}. The manifest was "
                "tampered with; do not load this checkpoint.",
                file=relpath,
            )
    return parts


__all__ = [
    "BLOBS",
    "BLOB_KEY_RE",
    "LOG_NAME",
    "MANIFEST_NAME",
    "MARKER",
    "OLD_STAGED_FILE_RE",
    "OLD_STAGE_RE",
    "OLD_TRASH_RE",
    "PAYLOAD_RE",
    "STAGED_FILE_STEM",
    "STAGE_PREFIX",
    "STAGE_RE",
    "TMP_MARK",
    "TRASH_ENTRY",
    "TRASH_PREFIX",
    "TRASH_RE",
    "TRASH_SP_PREFIX",
    "check_name",
    "component_problem",
    "split",
]
