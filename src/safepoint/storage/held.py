"""A checkpoint directory held open by a reader, and the refusals of hostile entries.

A reader that opens a checkpoint's files by path can meet two versions of it: a
writer re-saving the same name swaps a new directory in and deletes the old one.
:func:`hold` opens the directory once and returns a view of the storage whose reads
of that checkpoint are relative to the descriptor (``openat``); :class:`Held` is what
the view holds.

Entries that are not regular files or directories (a FIFO, a device, a symbolic
link) are refused, never followed or opened in a way that could block.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING

from safepoint.errors import CorruptCheckpointError
from safepoint.ondisk.names import check_name
from safepoint.storage.files import translate_read

if TYPE_CHECKING:  # only for annotations: storage imports this module
    from safepoint.storage.local import LocalStorage

#: A plain read-only open, as ``LocalStorage._open`` makes it: ``O_NONBLOCK`` so that a
#: FIFO where a file belongs cannot block the open, ``O_NOCTTY`` so that a terminal
#: device cannot become the process's controlling terminal before it is refused.
READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
#: A checkpoint directory; ``O_DIRECTORY`` refuses a FIFO before it is opened.
DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: Files of one checkpoint opened ahead of reading: well below the usual 1024 descriptors.
PREOPEN = 64

__all__ = [
    "DIR",
    "PREOPEN",
    "READ",
    "Held",
    "hold",
    "kind",
    "not_a_file",
    "preopen",
    "refusal",
    "release",
    "replaced",
]


def kind(mode: int) -> str:
    """What a file of ``mode`` is, in words, for error messages."""
    for test, words in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return words
    return "a special file"


def not_a_file(path: str, relpath: str, mode: int) -> CorruptCheckpointError:
    """The error for an opened descriptor that is not a regular file."""
    what = kind(mode)
    return CorruptCheckpointError(
        f"{path} is {what}. Expected a regular file. Received: {what}. It was not "
        "written by safepoint; delete it.",
        file=relpath,
        expected="a regular file",
        actual=what,
    )


def refusal(root: str, relpath: str) -> CorruptCheckpointError:
    """The error for a component of ``relpath`` that is a link, or not a directory."""
    what = "a symbolic link"
    with contextlib.suppress(OSError):
        path = root
        parts = relpath.split("/")
        for index, part in enumerate(parts):
            path = os.path.join(path, part)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode) and index < len(parts) - 1:
                what = "a file where a checkpoint directory belongs"
                break
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                what = kind(mode)
                break
    return CorruptCheckpointError(
        f"Refusing to read {os.path.join(root, relpath)} through {what}. Expected regular "
        f"files and directories inside the checkpoint root. Received: {what}. Replace it "
        "with the file or directory it stands for, or delete it.",
        file=relpath,
        expected="regular files and directories",
        actual=what,
    )


class Held:
    """Checkpoint directory ``name`` of ``root``, open as ``fd``, and files opened in it."""

    def __init__(self, root: str, name: str, fd: int) -> None:
        self.root, self.name, self.fd = root, name, fd
        info = os.fstat(fd)
        self.identity = (info.st_dev, info.st_ino)
        self.files: dict[str, int] = {}

    def preopen(self, relpaths: Sequence[str]) -> None:
        """Open files of the directory now, before a writer replacing it deletes them."""
        for relpath in relpaths[:PREOPEN]:
            parts = relpath.split("/")
            if len(parts) != 2 or parts[0] != self.name or relpath in self.files:
                continue
            try:
                fd = os.open(parts[1], READ | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
            except OSError:
                continue  # reported, with the usual error, when the reader opens it
            self.files[relpath] = fd

    def replaced(self) -> bool:
        """True when the name now stands for another directory (or for nothing)."""
        try:
            info = os.lstat(os.path.join(self.root, self.name))
        except OSError:
            return True
        return (info.st_dev, info.st_ino) != self.identity

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
        os.close(self.fd)


def hold(storage: LocalStorage, name: str) -> LocalStorage:
    """A view of ``storage`` in which checkpoint ``name`` is the directory open now.

    Every read of ``name/...`` through the view is relative to the directory opened
    here, so a writer that re-saves the name meanwhile (an atomic swap, then the old
    directory deleted) cannot mix two versions: the reader sees one whole, or fails on
    a file already deleted and can tell by :func:`replaced` to start again. The view
    is a copy of the storage (a subclass keeps its hooks), for reading in one thread
    until :func:`release`.
    """
    check_name(name, what="checkpoint name")
    with translate_read(storage.describe(name)):
        rootfd = os.open(storage.root, DIR)
        try:
            fd = os.open(name, DIR | os.O_NOFOLLOW, dir_fd=rootfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise refusal(storage.root, name) from exc
            raise
        finally:
            os.close(rootfd)
    view = copy.copy(storage)
    view._pinned = Held(storage.root, name, fd)
    return view


def preopen(view: LocalStorage, relpaths: Sequence[str]) -> None:
    """Open files of the view's checkpoint now, before a writer replacing it deletes them."""
    if view._pinned is not None:
        view._pinned.preopen(relpaths)


def replaced(view: LocalStorage) -> bool:
    """True when the view's checkpoint name now stands for another directory, or none."""
    return view._pinned is not None and view._pinned.replaced()


def release(view: LocalStorage) -> None:
    """Close what :func:`hold` and :func:`preopen` opened."""
    if view._pinned is not None:
        view._pinned.close()
