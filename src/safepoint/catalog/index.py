"""The catalog of a root: its committed checkpoints, derived from their manifests.

Nothing here is bookkeeping: every answer is read from the root (manifests parse-cached
by their bytes), so a restarted process, or a reader in another process, sees the same
run as the writer. Order is the manifest's ``seq``, never a name or an mtime.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace

from safepoint.catalog import reader, singlefile
from safepoint.checkpoint import Checkpoint, Verification
from safepoint.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    IncompleteCheckpointError,
    SafepointError,
    StorageError,
)
from safepoint.ondisk.manifest import MAX_BYTES, Manifest, parse
from safepoint.ondisk.manifest import NAME as MANIFEST_NAME
from safepoint.storage.local import LOG_NAME, TMP_MARK, TRASH_PREFIX, Storage, check_name

log = logging.getLogger("safepoint")

#: A checkpoint with one of these problems is skipped by ``restore('latest')``.
UNREADABLE = (CorruptCheckpointError, IncompatibleCheckpointError, IncompleteCheckpointError)


class Catalog:
    """Lists, resolves and verifies the checkpoints under one storage root."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._cache: dict[str, tuple[bytes, Manifest]] = {}
        self._warned: set[str] = set()

    def manifest(self, name: str) -> Manifest:
        """The parsed manifest of ``name`` (a directory or a single-file checkpoint)."""
        if singlefile.is_single_file(self.storage, name):
            relpath = name
            data = singlefile.manifest_bytes(self.storage, name)
        else:
            relpath = f"{name}/{MANIFEST_NAME}"
            data = self.storage.read_bytes(relpath, max_size=MAX_BYTES)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == data:
            return cached[1]
        found = parse(data, where=relpath)
        self._cache[name] = (data, found)
        return found

    def forget(self, name: str) -> None:
        """Drop the cached manifest of ``name`` (after it was replaced or deleted)."""
        self._cache.pop(name, None)

    def entries(self) -> list[str]:
        """Names in the root that may be checkpoints (staging, trash and the log excluded)."""
        return [
            n
            for n in self.storage.list_names()
            if n != LOG_NAME
            and TMP_MARK not in n
            and not n.startswith((TRASH_PREFIX, "."))
            and (self.storage.is_dir(n) or singlefile.is_single_file(self.storage, n))
        ]

    def to_checkpoint(self, found: Manifest, name: str) -> Checkpoint:
        return Checkpoint(
            name=name,
            path=os.path.join(self.storage.root, name),
            step=found.step,
            epoch=found.epoch,
            metrics=dict(found.metrics),
            created=found.created,
            seq=found.seq,
        )

    def checkpoints(self) -> list[Checkpoint]:
        """Committed checkpoints, oldest first (by the manifest's ``seq``)."""
        out = []
        for name in self.entries():
            try:
                found = self.manifest(name)
            except FileNotFoundError:
                continue  # no manifest: never committed
            except StorageError:
                # The disk failed to read it (EIO...): it may well be committed, so a
                # listing without it is wrong. A save would take a seq that is not the
                # largest, and restore('latest') would quietly resume an older one.
                raise
            except UNREADABLE as exc:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("safepoint: not listing %s: %s", name, exc)
                continue
            out.append(self.to_checkpoint(found, name))
        out.sort(key=lambda c: (c.seq, c.name))
        return out

    def _has_manifest(self, name: str) -> bool:
        try:
            return self.storage.exists(f"{name}/{MANIFEST_NAME}")
        except SafepointError:
            return True  # there, but refused (a link): a damaged checkpoint
        except OSError:
            return False

    def resolve(self, checkpoint: str | int, *, best: Callable[[], Checkpoint | None]) -> list[str]:
        """Candidate names for ``checkpoint``, best candidate first."""
        if checkpoint == "latest":
            listed = [c.name for c in reversed(self.checkpoints())]
            # A directory whose manifest exists but does not parse (damaged, or written
            # by a newer safepoint) is not listed, yet the root is not empty: try it
            # last so restore() reports it rather than claim there is nothing to resume.
            broken = [n for n in self.entries() if n not in listed and self._has_manifest(n)]
            return listed + broken
        if checkpoint == "best":
            found = best()
            return [found.name] if found else []
        if isinstance(checkpoint, int) and not isinstance(checkpoint, bool):
            listed_all = self.checkpoints()
            matches = [c.name for c in reversed(listed_all) if c.step == checkpoint]
            if not matches:
                raise CheckpointNotFoundError(
                    f"No committed checkpoint with step={checkpoint} in {self.storage.root}. "
                    f"Expected one of {[c.step for c in listed_all]}. Pick one of those steps."
                )
            return matches[:1]
        if isinstance(checkpoint, str):
            return [check_name(checkpoint)]
        raise ConfigError(
            "checkpoint must be 'latest', 'best', a checkpoint name or a step number. "
            f"Received: checkpoint={checkpoint!r}."
        )

    def load(self, checkpoint: str | int, *, best: Callable[[], Checkpoint | None]) -> Checkpoint:
        """Read and verify ``checkpoint``; return it with its state tree in ``.state``.

        ``"latest"`` falls back to the newest checkpoint that verifies, logging each one
        it skips and why; any other request raises the error of the one it names.
        """
        candidates = self.resolve(checkpoint, best=best)
        if not candidates:
            raise CheckpointNotFoundError(
                f"No committed checkpoint in {self.storage.root} to restore "
                f"(checkpoint={checkpoint!r}). Expected at least one save before restoring. "
                "Pass missing_ok=True to start fresh when there is none."
            )
        errors: list[str] = []
        tried: set[str] = set()
        while candidates:
            name = candidates.pop(0)
            tried.add(name)
            try:
                found, loaded = reader.read_checkpoint(self.storage, name)
            except CheckpointNotFoundError:
                if checkpoint != "latest":
                    raise
                # The writer's retention deleted it after this reader listed the root:
                # newer checkpoints exist, so list again instead of giving up.
                candidates = [n for n in self.resolve(checkpoint, best=best) if n not in tried]
                continue
            except UNREADABLE as exc:
                if checkpoint != "latest":
                    raise
                log.warning("safepoint: skipping %s while restoring latest: %s", name, exc)
                errors.append(f"{name}: {exc}")
                continue
            if errors:
                log.warning(
                    "safepoint: restored %s after skipping %d newer checkpoint(s)",
                    name,
                    len(errors),
                )
            return replace(self.to_checkpoint(found, name), state=loaded)
        if not errors:  # every one listed was deleted while read, and none is left
            raise CheckpointNotFoundError(
                f"No committed checkpoint left in {self.storage.root} to restore: the ones "
                "listed were deleted while being read. Expected at least one. List it again."
            )
        raise CorruptCheckpointError(
            f"No checkpoint in {self.storage.root} verifies; tried {len(errors)}: "
            + " | ".join(errors)
            + ". Restore from a backup or start a new run."
        )

    def verify(self) -> list[Verification]:
        """Check every checkpoint's manifest, sizes and checksums."""
        results = []
        for name in self.entries():
            try:
                reader.verify(self.storage, name)
                results.append(Verification(name))
            except CheckpointNotFoundError:
                continue  # deleted (by the writer's retention) since it was listed
            except FileNotFoundError:
                results.append(
                    Verification(
                        name,
                        IncompleteCheckpointError(
                            f"{name} has no manifest: it was never committed."
                        ),
                    )
                )
            except IncompleteCheckpointError as exc:
                if self._has_payload(name):
                    results.append(Verification(name, exc))
                # else: a folder of the user's next to the checkpoints, not ours to judge
            except SafepointError as exc:
                results.append(Verification(name, exc))
        return results

    def _has_payload(self, name: str) -> bool:
        """Whether folder ``name`` holds a first payload shard, as a lost commit would.

        A folder without a manifest and without safepoint's shards is the user's own
        (logs, exported models): verifying a root must not call it a failed checkpoint.
        """
        return any(self.storage.exists(f"{name}/{first}") for first in _FIRST_SHARDS)


#: The first payload file of a directory checkpoint, in each payload format.
_FIRST_SHARDS = ("model-00000.safetensors", "model-00000.h5")

__all__ = ["UNREADABLE", "Catalog"]
