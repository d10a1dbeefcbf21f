"""Names inside a checkpoint root: which are safe, which are safepoint's own.

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
#: Names earlier versions derived from the checkpoint name (still cleaned up, carefully).
OLD_STAGE_RE = re.compile(r"^(?P<name>.+)\.tmp-[0-9a-f]{4,8}$", re.DOTALL)
OLD_TRASH_RE = re.compile(r"^\.trash-(?P<name>.+)-[0-9a-f]{4,8}$", re.DOTALL)


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
    for part in parts:
        problem = component_problem(part)
        if problem and not (
            STAGE_RE.match(part)
            or (TMP_MARK in part and component_problem(part.replace(TMP_MARK, "-")) is None)
        ):
            raise CorruptCheckpointError(
                f"Refusing a path that leaves the checkpoint root: {problem}. Expected a "
                f"relative path inside the root. Received: path={relpath!r}. The manifest was "
                "tampered with; do not load this checkpoint.",
                file=relpath,
            )
    return parts
