"""A power-loss layer for a local root: what survives is exactly what ``fsync`` made durable.

Used by the reliability suite (tests/reliability/test_f05_power_loss.py) and by the
dedup tests (tests/dedup/test_dedup_power_loss.py). The layer records, at each
``fsync`` of a file or a directory, that object's content (a directory's entries by
inode, so hard links survive as links); every stage of a save and every fsync is a
numbered crash point, and ``cut_at=N`` cuts the power before point N.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from safepoint.storage.local import LocalStorage
from safepoint_testing import fail_at


class PowerCut(BaseException):
    """The power went out here (a BaseException: nothing may catch and carry on)."""


class PowerLossStorage(LocalStorage):
    """A local root whose durable state is exactly what ``fsync`` made durable."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, *, cut_at: int | None = None):
        # every stage of a save is a crash point, as is every fsync
        super().__init__(root, faults=fail_at(None, self._stage_point, times=None))
        self.cut_at = cut_at
        self.points: list[str] = []
        self.dead = False
        self.dirs: dict[int, dict[str, tuple[int, bool]]] = {}
        self.files: dict[int, bytes] = {}
        self.root_ino = os.stat(self.root).st_ino
        self._snapshot_all()
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            self._point("fsync")
            real_fsync(fd)
            self._made_durable(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    # -- the durable image ---------------------------------------------------------------
    def _snapshot_all(self) -> None:
        """Everything on disk before the layer starts counts as durable."""
        for here, _, filenames in os.walk(self.root):
            self._record_dir(here, os.lstat(here).st_ino)
            for name in filenames:
                path = os.path.join(here, name)
                self.files[os.lstat(path).st_ino] = Path(path).read_bytes()

    def _record_dir(self, path: str, ino: int) -> None:
        entries = {}
        for name in os.listdir(path):
            info = os.lstat(os.path.join(path, name))
            entries[name] = (info.st_ino, stat.S_ISDIR(info.st_mode))
        self.dirs[ino] = entries

    def _made_durable(self, fd: int) -> None:
        if self.dead:
            return
        info = os.fstat(fd)
        proc = f"/proc/self/fd/{fd}"
        if stat.S_ISDIR(info.st_mode):
            self._record_dir(proc, info.st_ino)
        elif stat.S_ISREG(info.st_mode):
            with open(proc, "rb") as f:
                self.files[info.st_ino] = f.read()

    # -- crash points --------------------------------------------------------------------
    #: Blob writers and async save workers meet crash points from several threads;
    #: counted under a lock, exactly one of them is point ``cut_at``.
    _counting = threading.Lock()

    def _point(self, what: str) -> None:
        with self._counting:
            if self.dead:
                raise PowerCut(f"no power (at {what})")
            self.points.append(what)
            if self.cut_at is not None and len(self.points) == self.cut_at:
                self.dead = True
                raise PowerCut(f"power cut before {what} (point {self.cut_at})")

    def _stage_point(self, stage: str, target: str) -> None:
        self._point(stage)

    # -- the outage ----------------------------------------------------------------------
    def power_loss(self) -> None:
        """Replace the root's contents with its durable image (hard links kept)."""
        self.dead = True
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        self._rebuild(self.root, self.root_ino, {})

    def _rebuild(self, path: str, ino: int, made: dict[int, str]) -> None:
        for name, (child, is_dir) in self.dirs.get(ino, {}).items():
            target = os.path.join(path, name)
            if is_dir:
                os.mkdir(target)
                self._rebuild(target, child, made)
            elif child in made:  # another name of an inode already rebuilt: a hard link
                os.link(made[child], target)
            else:
                Path(target).write_bytes(self.files.get(child, b""))
                made[child] = target


__all__ = ["PowerCut", "PowerLossStorage"]
