"""What a local-first directory has uploaded: the root it mirrors and each name's record.

``.safepoint-local-first.json`` in the local directory names the bucket root it belongs
to and, for every checkpoint name, the digest of the record this directory last saw
committed in the bucket (uploaded by it, or found equal there). That is what tells, on
a restart, a local copy the bucket has not seen yet (upload it) from one the bucket
has moved past while the job ran elsewhere (the bucket wins: the stale copy is never
read and never uploaded, so it cannot overwrite the newer checkpoint or bring back
one that was deleted).

The file is replaced atomically (write, fsync, rename) after each change; only the
root's writer (holding its lock) changes it.
"""

from __future__ import annotations

import json
import os
import threading

from safepoint.errors import ConfigError, StorageError
from safepoint.ondisk import checksum
from safepoint.storage.files import translate

#: The ledger's file name inside the local-first directory.
NAME = ".safepoint-local-first.json"
_MAX = 16 << 20


def digest(record: bytes) -> str:
    return checksum.digest_bytes(record)


class Ledger:
    """The ledger of one local-first directory (see the module docstring)."""

    def __init__(self, directory: str, root: str, confirmed: dict[str, str], *, new: bool) -> None:
        self.directory, self.root = directory, root
        self._confirmed = confirmed
        self._new = new
        self._mutex = threading.Lock()

    @classmethod
    def load(cls, directory: str, root: str, *, holds_checkpoints: bool) -> Ledger:
        """The ledger of ``directory`` for bucket root ``root``.

        ``ConfigError`` when the directory belongs to another root, or holds checkpoints
        without a ledger (a plain run root: uploading them would mix two runs).
        """
        path = os.path.join(directory, NAME)
        try:
            with open(path, "rb") as f:
                data = f.read(_MAX + 1)
        except FileNotFoundError:
            if holds_checkpoints:
                raise ConfigError(
                    f"{directory} holds checkpoints but is no local_first directory. Expected "
                    f"an empty or new directory, or one used before for {root}. Received: "
                    "checkpoints of another run (uploading them would mix two runs). Choose "
                    "another local_first directory."
                ) from None
            return cls(directory, root, {}, new=True)
        except OSError as exc:
            raise StorageError(f"Cannot read {path}: {exc}. Check its permissions.") from exc
        try:
            body = json.loads(data) if len(data) <= _MAX else None
        except ValueError:
            body = None
        recorded = body.get("root") if isinstance(body, dict) else None
        if recorded != root:
            raise ConfigError(
                f"{directory} is the local_first directory of another root. Expected one that "
                f"belongs to {root} (or a new one). Received: {NAME} names {recorded!r}. Use a "
                "separate local_first directory for each run root."
            )
        uploaded = body.get("uploaded") if isinstance(body, dict) else None
        confirmed = {
            str(k): str(v)
            for k, v in (uploaded.items() if isinstance(uploaded, dict) else ())
            if isinstance(v, str)
        }
        return cls(directory, root, confirmed, new=False)

    def may_upload(self, name: str, record: bytes, remote: bytes | None, *, mine: bool) -> bool:
        """Whether the local copy (``record``) of ``name`` may be read and uploaded over
        the bucket's (``remote``, None when absent): this process committed it
        (``mine``), or the bucket holds what this directory last saw there, or the name
        never reached the bucket."""
        if remote == record or mine:
            return True
        confirmed = self.confirmed(name)
        if remote is None:
            return confirmed is None  # never uploaded: catch up; else deleted there
        return confirmed == digest(remote)

    def confirmed(self, name: str) -> str | None:
        """The digest of the record last seen committed in the bucket under ``name``."""
        with self._mutex:
            return self._confirmed.get(name)

    def confirm(self, name: str, record: bytes) -> None:
        with self._mutex:
            if self._confirmed.get(name) == digest(record) and not self._new:
                return
            self._confirmed[name] = digest(record)
        self.save()

    def forget(self, name: str) -> None:
        with self._mutex:
            if self._confirmed.pop(name, None) is None:
                return
        self.save()

    def save(self) -> None:
        """Write the ledger atomically (it is what a restart trusts)."""
        with self._mutex:
            body = json.dumps({"root": self.root, "uploaded": self._confirmed}, sort_keys=True)
            self._new = False
        path = os.path.join(self.directory, NAME)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with translate("write", path):
            with open(tmp, "wb") as f:
                f.write(body.encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)


__all__ = ["NAME", "Ledger", "digest"]
