"""What a path given on the command line is, and the error when it is the wrong kind.

The CLI takes two kinds of argument: a run root (``ls``, ``verify``, ``log``, ``plot``,
``gc``) and one checkpoint (``show``, ``diff``, ``convert``). Users mix them up, make
typos, and point the tools at the run log or at a Keras file they wrote themselves.
Each mistake gets a message that says what the path is and what to type instead, and
an exit code from the error class: a missing path is 3 (not found) so that a backup
check with a typo fails; a safepoint path of the wrong kind is 2 (bad argument); a
file safepoint did not write is 6 (incompatible). Nothing here ever advises deleting
a path: a run root holds every checkpoint of a run.

Classifying never opens anything but directories and safepoint's own files: a FIFO is
recognised by ``stat`` and never opened (opening one would block).
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass

from safepoint.catalog import singlefile
from safepoint.catalog.index import Catalog
from safepoint.catalog.versions import ABSENT_WAITS
from safepoint.cli.remote import classify_url, storage_at
from safepoint.errors import (
    CheckpointNotFoundError,
    ConfigError,
    IncompatibleCheckpointError,
    IncompleteCheckpointError,
    StorageError,
)
from safepoint.ondisk.manifest import NAME as MANIFEST_NAME
from safepoint.storage.local import LOG_NAME, TMP_MARK, TRASH_PREFIX, LocalStorage
from safepoint.storage.protocol import Storage
from safepoint.storage.urls import is_url

__all__ = ["PathKind", "classify", "need_checkpoint", "need_root"]

#: Suffixes of files written by ``torch.save``/``pickle``: never opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar")


@dataclass(frozen=True)
class PathKind:
    """``kind`` is one of: missing, unreadable, special, runlog, checkpoint, foreign, pickle, file,
    root, empty, leftover, uncommitted, directory. ``detail`` says more (for a root:
    its newest checkpoint's name; for a single file: its container)."""

    path: str
    kind: str
    detail: str = ""
    count: int = 0

    @property
    def parent(self) -> str:
        return os.path.dirname(self.path)


def _special(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "not a regular file or directory"


_PAYLOAD = re.compile(r"^model-\d{5}\.(safetensors|h5)$")


def _payload_only(full: str, names: list[str]) -> bool:
    """Payload files and nothing else (no run log, no subdirectory): the body of a
    checkpoint directory whose manifest is missing, not a run root."""
    return any(_PAYLOAD.match(n) for n in names) and all(
        n != LOG_NAME and os.path.isfile(os.path.join(full, n)) for n in names
    )


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _writer_in_flight(parent: str) -> bool:
    try:
        return any(TMP_MARK in n or n.startswith(TRASH_PREFIX) for n in os.listdir(parent))
    except OSError:
        return False


def classify(path: str, *, listing: bool = True) -> PathKind:
    """Say what ``path`` is, reading as little as possible (never opening a FIFO).

    ``listing=False`` tells a run root from other directories by its names alone,
    without reading every manifest (the command about to list it will).

    A writer may re-save the name while we look: the old version we resolved is then
    deleted, manifest first, and would look uncommitted or empty. So such an answer
    counts only if the path still names the directory we looked at; and a missing
    name is looked up again for a moment while a save is in flight beside it.
    """
    if is_url(path):
        url = path.rstrip("/")
        return PathKind(url, *classify_url(url, listing=listing))
    for _ in range(3):
        before = _inode(path)
        found = _classify_now(path, listing=listing)
        if found.kind not in ("uncommitted", "empty") or _inode(path) == before:
            break
    if found.kind == "missing" and _writer_in_flight(os.path.dirname(found.path)):
        for wait in ABSENT_WAITS:  # a re-save may be between its two renames
            time.sleep(wait)
            again = _classify_now(path, listing=listing)
            if again.kind != "missing":
                return again
    return found


def _classify_now(path: str, *, listing: bool) -> PathKind:
    """:func:`_classify`, where a directory renamed away while it is looked at (a re-save
    between its two renames) is missing, not an error."""
    try:
        return _classify(path, listing=listing)
    except (FileNotFoundError, NotADirectoryError):
        return PathKind(os.path.abspath(path).rstrip(os.sep) or os.sep, "missing", "")


def _classify(path: str, *, listing: bool) -> PathKind:
    full = os.path.abspath(path).rstrip(os.sep) or os.sep
    if os.path.islink(full) and os.path.exists(full):
        # A link the user typed is theirs to follow (links *inside* a root are refused
        # by the readers): work on what it points to, and name that in messages.
        full = os.path.realpath(full)
    name = os.path.basename(full)
    try:
        mode = os.stat(full).st_mode  # the user named this path: follow a link they gave
    except FileNotFoundError:
        return PathKind(full, "missing", "a dangling symlink" if os.path.islink(full) else "")
    except NotADirectoryError:
        return PathKind(full, "missing", "a path below a file")
    except OSError as exc:  # a symlink loop, a name too long, a directory we may not search
        return PathKind(full, "unreadable", exc.strerror or type(exc).__name__)
    if stat.S_ISREG(mode):
        if name == LOG_NAME:
            return PathKind(full, "runlog")
        kind = singlefile.container(name)
        if kind is not None:
            storage = LocalStorage(os.path.dirname(full))
            if singlefile.is_single_file(storage, name):
                return PathKind(full, "checkpoint", kind)
            if name.lower().endswith(PICKLE_SUFFIXES):  # Lightning's own .ckpt: a pickle
                return PathKind(full, "pickle")
            return PathKind(full, "foreign", kind)
        if name.lower().endswith(PICKLE_SUFFIXES):
            return PathKind(full, "pickle")
        return PathKind(full, "file")
    if not stat.S_ISDIR(mode):
        return PathKind(full, "special", _special(mode))
    if os.path.lexists(os.path.join(full, MANIFEST_NAME)):
        return PathKind(full, "checkpoint", "directory")
    names = os.listdir(full)
    if not names:
        return PathKind(full, "empty")
    if TMP_MARK in name or name.startswith(TRASH_PREFIX):
        return PathKind(full, "leftover")
    if _payload_only(full, names):
        return PathKind(full, "uncommitted")
    if not listing:
        return PathKind(full, "root")
    catalog = Catalog(LocalStorage(full))
    listed = catalog.checkpoints()
    if listed:
        return PathKind(full, "root", listed[-1].name, len(listed))
    damaged = [
        n
        for n in catalog.entries()
        if not catalog.storage.is_dir(n) or os.path.lexists(os.path.join(full, n, MANIFEST_NAME))
    ]
    if LOG_NAME in names or damaged:
        return PathKind(full, "root")  # a run whose checkpoints are gone or all damaged
    return PathKind(full, "directory")


def _what(found: PathKind) -> str:
    """A phrase naming what ``found`` is, for messages."""
    return {
        "special": found.detail,
        "runlog": f"the run log of the run root {found.parent}",
        "checkpoint": "a checkpoint file"
        if found.detail != "directory"
        else "a checkpoint directory",
        "foreign": ("a .keras zip" if found.detail == "zip" else "an HDF5 file")
        + " that safepoint did not write (it has no embedded safepoint manifest)",
        "pickle": "a pickle file (torch.save and the like)",
        "file": "a plain file",
        "root": f"a run root holding {found.count} committed checkpoint(s)",
        "empty": "a prefix with no checkpoints (or a misspelt one)"
        if is_url(found.path)
        else "an empty directory",
        "leftover": "the leftover of an interrupted save (a staging or trash directory), not "
        "a committed checkpoint",
        "uncommitted": "a directory with payload files but no manifest.json: a checkpoint that "
        "was never committed, or whose manifest was lost",
        "directory": "a directory with neither a manifest.json nor checkpoints in it",
    }.get(found.kind, found.kind)


def _unreadable(found: PathKind, expected: str) -> StorageError:
    return StorageError(
        f"{found.path} cannot be examined: {found.detail}. Expected {expected}. Received: "
        f"path={found.path!r}. Check the path and its permissions.",
        stage="stat",
    )


def _missing(found: PathKind, expected: str) -> CheckpointNotFoundError:
    why = f" ({found.detail})" if found.detail else ""
    return CheckpointNotFoundError(
        f"{found.path} does not exist{why}. Expected {expected}. Received: path="
        f"{found.path!r}. Check the path for a typo."
    )


def need_root(path: str, command: str) -> PathKind:
    """``path`` as a run root for ``command``, or the error that explains what it is.

    An empty or checkpoint-less directory is a root (with nothing in it yet); whether
    that is an error is the command's call (``verify`` finds nothing to verify).
    """
    found = classify(path, listing=False)
    expected = "a run root (the directory a CheckpointManager saves into)"
    if found.kind == "missing":
        raise _missing(found, expected)
    if found.kind == "unreadable":
        raise _unreadable(found, expected)
    if found.kind in ("root", "empty", "directory"):
        return found
    hint = f"Run 'safepoint {command} {found.parent}' for its run root"
    if found.kind == "runlog":
        hint = f"Run 'safepoint log {found.parent}' to print it"
    elif found.kind == "checkpoint":
        hint += f", or 'safepoint show {found.path}' for this checkpoint"
    elif found.kind in ("foreign", "pickle", "file", "special"):
        hint = "Pass the directory a CheckpointManager or safepoint.keras saves into"
    raise ConfigError(
        f"{found.path} is {_what(found)}, not a run root. Expected {expected}. Received: "
        f"path={found.path!r}. {hint}."
    )


def need_checkpoint(path: str, command: str) -> tuple[Storage, str, PathKind]:
    """``path`` as one committed checkpoint: its parent storage and name.

    A directory without a manifest inside a run root is reported as what it is; the
    reader's own errors (corrupt, incomplete) still come from reading it.
    """
    found = classify(path)
    expected = "a checkpoint directory (with manifest.json) or a file written by safepoint.keras"
    if found.kind == "missing" and os.path.isdir(found.parent):
        raise CheckpointNotFoundError(
            f"No checkpoint named {os.path.basename(found.path)!r} in {found.parent}: "
            f"{found.path} does not exist. Expected "
            f"{expected}. Received: path={found.path!r}. Run 'safepoint ls {found.parent}' "
            "for the names of its checkpoints."
        )
    if found.kind == "missing":
        raise _missing(found, expected)
    if found.kind == "unreadable":
        raise _unreadable(found, expected)
    if found.kind == "checkpoint":
        return storage_at(found.parent), os.path.basename(found.path), found
    received = f"Received: path={found.path!r}."
    if found.kind == "root":
        example = os.path.join(found.path, found.detail) if found.detail else "ROOT/NAME"
        raise ConfigError(
            f"{found.path} is {_what(found)}, not one checkpoint. Expected {expected}. "
            f"{received} Run 'safepoint ls {found.path}' to list its checkpoints, then "
            f"'safepoint {command} {example}'."
        )
    if found.kind == "pickle":
        raise IncompatibleCheckpointError(
            f"{found.path} is a file, not a safepoint checkpoint; safepoint never opens "
            "pickle files (torch.save, .pt/.pth/.ckpt) because loading one can run arbitrary "
            f"code. Expected {expected}. {received} To import it, in an environment you "
            "trust run: state = torch.load(path, weights_only=True); then "
            "safepoint.CheckpointManager(ROOT).save(state, step=...)."
        )
    if found.kind in ("foreign", "file"):
        raise IncompatibleCheckpointError(
            f"{found.path} is {_what(found)}, not a safepoint checkpoint. Expected {expected}. "
            f"{received} Load it with the program that wrote it"
            + (" (keras.models.load_model, model.load_weights)." if found.detail else ".")
        )
    if found.kind in ("empty", "directory", "leftover"):
        raise CheckpointNotFoundError(
            f"{found.path} is {_what(found)}. Expected {expected}. {received} Run "
            f"'safepoint ls {found.parent}' to list the checkpoints of its run."
        )
    if found.kind == "uncommitted":
        raise IncompleteCheckpointError(
            f"{found.path} is {_what(found)}. Expected {expected}. {received} Use another "
            f"checkpoint of the run: 'safepoint ls {found.parent}'."
        )
    raise ConfigError(
        f"{found.path} is {_what(found)}, not a checkpoint. Expected {expected}. {received} "
        + (
            f"Run 'safepoint log {found.parent}' to print it."
            if found.kind == "runlog"
            else "Pass a checkpoint path that 'safepoint ls ROOT' prints."
        )
    )
