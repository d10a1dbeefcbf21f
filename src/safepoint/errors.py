"""safepoint's exception tree, and the command-line exit code of each error.

::

    SafepointError                      base of everything safepoint raises on purpose
    ├── ConfigError(ValueError)         a bad argument, template, name or state leaf
    ├── CheckpointNotFoundError(FileNotFoundError)
    │                                   no checkpoint by that name/step, or an empty root
    ├── IncompleteCheckpointError       a directory without a commit record (manifest)
    ├── CorruptCheckpointError          a checksum, size, offset, dtype or path check failed
    ├── IncompatibleCheckpointError     written by a newer format version
    ├── StateMismatchError              the checkpoint does not fit the object to restore into
    └── StorageError(OSError)           the storage refused a write, a read, a lock or a rename

Every message follows one shape: what failed, what was expected, what was received,
how to fix it. Backend exceptions (``OSError`` from the file system) are translated
into these classes in exactly one place, :mod:`safepoint.storage.local`.
"""

from __future__ import annotations

import errno as _errno


class SafepointError(Exception):
    """Base class of every error safepoint raises on purpose."""

    exit_code = 1


class ConfigError(SafepointError, ValueError):
    """An argument, a name template or a state leaf that safepoint cannot accept."""

    exit_code = 2


class CheckpointNotFoundError(SafepointError, FileNotFoundError):
    """No checkpoint matches the request (or the root holds none)."""

    exit_code = 3


class IncompleteCheckpointError(SafepointError):
    """A checkpoint directory that was never committed (it has no manifest)."""

    exit_code = 4


class CorruptCheckpointError(SafepointError):
    """A committed checkpoint whose bytes are not what its manifest promises.

    ``file``, ``expected`` and ``actual`` name the first check that failed so that
    tools (and people) can tell a flipped bit from a truncated file.
    """

    exit_code = 5

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        expected: object = None,
        actual: object = None,
    ) -> None:
        super().__init__(message)
        self.file = file
        self.expected = expected
        self.actual = actual


class IncompatibleCheckpointError(SafepointError):
    """A checkpoint written by a newer (or foreign) format this version cannot read."""

    exit_code = 6


class StateMismatchError(SafepointError):
    """The checkpoint's state does not fit the objects it is restored into.

    ``missing``, ``unexpected`` and ``mismatched`` list the offending key paths.
    """

    exit_code = 7

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []


class StorageError(SafepointError, OSError):
    """The storage refused an operation; ``errno`` is kept from the cause.

    ``stage`` names the step of the save or restore that failed (``"write"``,
    ``"fsync"``, ``"manifest"``, ``"rename"``, ``"dir-fsync"``, ``"retention"``, ...).
    """

    exit_code = 8

    def __init__(self, message: str, *, errno: int | None = None, stage: str = "") -> None:
        SafepointError.__init__(self, message)
        self.errno = errno
        self.strerror = _errno.errorcode.get(errno, "") if errno else ""
        self.stage = stage

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateMismatchWarning(UserWarning):
    """``restore(strict=False)`` skipped part of the checkpoint or of the target.

    A warning, not an error: the caller asked for a partial load (fine-tuning a new
    head, a model that gained a layer), and every skipped key is named in it.
    """


__all__ = [
    "CheckpointNotFoundError",
    "ConfigError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "IncompleteCheckpointError",
    "SafepointError",
    "StateMismatchError",
    "StateMismatchWarning",
    "StorageError",
]
